"""ddpl_mamujoco.py: the CLI contract on the paper's four tasks (run folder, evaluation of a saved model, divergence
of one seed, bad input) and the env glue (fast step and index gather against the library's own step and observations,
termination vs truncation, HARL's one-joint partitions)."""

import csv
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tyro

import ddpl_mamujoco

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "ddpl_mamujoco.py")
# a tiny budget: 4 envs, 2 chunks of 40 steps (10 per env), updates from step 20, a 60-row buffer (it wraps around),
# 15-step episodes (training episodes end by truncation in the second chunk)
TINY = [
    "--total-timesteps", "80", "--eval-every", "40", "--num-envs", "4", "--learning-starts", "20",
    "--batch-size", "16", "--hidden-size", "32", "--num-diffusion-steps", "5", "--num-eval-episodes", "2",
    "--buffer-size", "60", "--max-episode-steps", "15",
]  # fmt: skip
# two processes side by side (one core each), each running main() on two paper tasks in turn: (task, extra flags)
GROUPS = [
    [("Ant-2x4", ["--num-seeds", "2", "--seed", "3", "--save-model"]), ("Ant-4x2", [])],
    [("Ant-8x1", ["--local-obs"]), ("HumanoidStandup-17x1", [])],
]
SUMMARY_KEYS = {"script", "env_id", "total_timesteps", "num_seeds", "final_eval_return", "best_eval_return"}
SUMMARY_KEYS |= {"wall_time_s", "sps", "diverged_seeds", "train_time_s", "env_time_s", "eval_time_s", "train_sps"}
COLUMNS = ["global_step", "seed", "episodic_return", "episode_length", "train_return", "q_first", "disc_return"]
COLUMNS += ["critic_loss", "actor_loss", "q_mean", "max_weight", "weight_ess", "eta", "env_share", "sps", "wall_time"]


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    """MuJoCo writes its warnings (e.g. HalfCheetah's deprecated settotalmass) to ./MUJOCO_LOG.TXT: not in the repo."""
    monkeypatch.chdir(tmp_path)


def start_cli(*flags, cwd):
    cmd = [sys.executable, SCRIPT, *flags]
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_rows(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The four paper tasks with the tiny budget, parsed by tyro like the command line; one interpreter per group
    (compiling dominates: about 25 s per task)."""
    tmp = tmp_path_factory.mktemp("train")
    code = (
        "import sys, tyro\nsys.path.insert(0, {root!r})\nimport ddpl_mamujoco as m\n"
        "for task, extra in {groups!r}:\n"
        "    args = tyro.cli(m.Args, args=[*{tiny!r}, *extra, '--task', task, '--runs-dir', {runs_dir!r}])\n"
        "    assert m.main(args) == 0, task\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code.format(root=ROOT, groups=group, tiny=TINY, runs_dir=str(tmp / "runs"))],
            cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        for group in GROUPS
    ]  # fmt: skip
    for proc in procs:
        _, stderr = proc.communicate(timeout=900)
        assert proc.returncode == 0, stderr.decode()[-3000:]
    return {json.loads((d / "config.json").read_text())["task"]: d for d in (tmp / "runs").iterdir()}


@pytest.mark.slow
@pytest.mark.parametrize("task", ddpl_mamujoco.PAPER_TASKS)
def test_run_folder_is_complete(runs, task):
    run_dir = runs[task]
    num_seeds = 2 if task == "Ant-2x4" else 1
    for name in ("config.json", "metrics.csv", "summary.json", "learning_curve.png"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "model.flax").is_file() == (task == "Ant-2x4")  # --save-model
    summary = json.loads((run_dir / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["script"] == "ddpl_mamujoco.py" and summary["env_id"] == f"MaMuJoCo_{task}"
    assert summary["num_seeds"] == num_seeds and summary["total_timesteps"] == 80 and summary["diverged_seeds"] == []
    assert summary["env_time_s"] < summary["train_time_s"]  # MuJoCo's stepping is part of training
    for key in ("final_eval_return", "best_eval_return"):
        assert set(summary[key]) == {"mean", "std", "per_seed"} and len(summary[key]["per_seed"]) == num_seeds
    config = json.loads((run_dir / "config.json").read_text())
    assert config["reward_scale"] == (0.01 if task.startswith("HumanoidStandup") else 1.0)  # the resolved default
    rows = read_rows(run_dir)
    assert list(rows[0]) == COLUMNS
    assert sorted({int(r["global_step"]) for r in rows}) == [40, 80] and len(rows) == 2 * num_seeds
    final = [float(r["episodic_return"]) for r in rows if r["global_step"] == "80"]
    assert summary["final_eval_return"]["per_seed"] == final
    for r in rows:
        assert np.isfinite(float(r["critic_loss"])) and np.isfinite(float(r["actor_loss"]))
        assert np.isfinite(float(r["q_first"]))  # the critic check, beside the discounted return obtained
        assert 0.25 <= float(r["max_weight"]) <= 1.0  # normalised over M = 4
        assert 1 <= float(r["episode_length"]) <= 15 and 0.0 < float(r["env_share"]) < 1.0
        if task.startswith("HumanoidStandup"):  # ~30-130 per step, never terminates: 15 steps
            assert float(r["episode_length"]) == 15 and 300 < float(r["episodic_return"]) < 2000
            # disc_return = sum_t 0.99^t 0.01 r_t with positive rewards: between 0.99^14 and 1 times 0.01 x return
            assert 0.0086 < float(r["disc_return"]) / float(r["episodic_return"]) < 0.01
    # 15-step episodes: every env has finished one by the end of the second chunk
    assert all(np.isfinite(float(r["train_return"])) for r in rows if r["global_step"] == "80")


@pytest.mark.slow
def test_evaluate_tool_reproduces_the_final_evaluation(runs, tmp_path):
    """benchmarks/evaluate.py on the saved model: the training run's last evaluation, bit for bit (compared as text)."""
    trained = runs["Ant-2x4"]
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "evaluate.py"), str(trained), "--json"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["script"] == "ddpl_mamujoco.py" and out["global_step"] == 80 and out["seeds"] == [3, 4]
    last = [r for r in read_rows(trained) if r["global_step"] == "80"]
    for name in ("episodic_return", "episode_length", "disc_return"):
        assert [repr(v) for v in out[name]] == [r[name] for r in last], name


@pytest.mark.slow
def test_one_seed_of_four_diverges_and_three_finish(tmp_path, monkeypatch, capsys):
    """Seed 5's critic is poisoned at the last iteration of the first chunk (an injected fault): its NaN actions then
    reach MuJoCo, which warns and steps on; seeds 3, 4 and 6 train on, the summary holds their statistics,
    diverged_seeds names seed 5, and main returns 1."""
    make_train = ddpl_mamujoco.make_train

    def poisoned(args, env):
        train = make_train(args, env)
        init, learn = train.init, train.learn

        def learn_with_fault(rs, transitions, iteration):
            rs, metrics, updated = learn(rs, transitions, iteration)
            bad = (rs["lane_seed"] == 5) & (iteration == train.iters_per_chunk - 1)
            critic = jax.tree.map(lambda x: jnp.where(bad, jnp.nan, x), rs["learner"]["critic"])
            return rs | {"learner": rs["learner"] | {"critic": critic}}, metrics, updated

        train.init, train.learn = lambda seed: init(seed) | {"lane_seed": seed}, learn_with_fault
        return train

    monkeypatch.setattr(ddpl_mamujoco, "make_train", poisoned)
    flags = [*TINY, "--seed", "3", "--num-seeds", "4", "--runs-dir", str(tmp_path / "runs")]
    assert ddpl_mamujoco.main(tyro.cli(ddpl_mamujoco.Args, args=flags)) == 1
    err = capsys.readouterr().err
    diverged = re.findall(r"seed \d+ diverged at env step \d+: [a-z_, ]+ non-finite", err)  # the message alone
    assert diverged == ["seed 5 diverged at env step 40: parameters non-finite"], err[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [d["seed"] for d in summary["diverged_seeds"]] == [5]
    final = {int(r["seed"]): float(r["episodic_return"]) for r in read_rows(run_dir) if r["global_step"] == "80"}
    assert summary["final_eval_return"]["per_seed"] == [final[3], final[4], final[6]]
    assert all(np.isfinite([final[3], final[4], final[6]])) and np.isfinite(summary["best_eval_return"]["mean"])
    assert np.isnan(final[5])  # its policy's NaN actions: NaN control costs in MuJoCo's reward


TYRO_ERRORS = {  # what tyro checks itself: flags -> the text its error box must hold
    ("--weight-rule", "max"): "Expected one of ('state', 'batch', 'raw')",
    ("--num-seeds", "two"): "--num-seeds",
    ("--eval-only",): "Unrecognized options: --eval-only",  # moved to benchmarks/evaluate.py
}


@pytest.mark.slow
def test_tyro_rejects_bad_input_with_exit_code_2(tmp_path):
    procs = {flags: start_cli(*flags, "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path) for flags in TYRO_ERRORS}
    for flags, proc in procs.items():  # side by side: each start imports JAX and gymnasium-robotics
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 2, (flags, stderr)
        assert TYRO_ERRORS[flags] in " ".join(ln.strip("│ ") for ln in stderr.splitlines()), stderr
        assert "Traceback" not in stderr
    assert not (tmp_path / "runs").exists()  # nothing written


@pytest.mark.parametrize(
    "flags, expected",
    [
        ({"task": "Ant-3x3"}, "--task: unknown 'Ant-3x3'; valid tasks: Ant-2x4, Ant-2x4d, Ant-4x2, Ant-8x1,"),
        ({"task": "Ant-3x3"}, "HumanoidStandup-17x1"),
        ({"task": "Reacher-2x1", "local_obs": True}, "drop --local-obs"),
        ({"num_action_samples": 1}, "--num-action-samples must be >= 2"),
        ({"eval_every": 10, "num_envs": 20}, "need --num-envs <= --eval-every <= --total-timesteps"),
        ({"reward_scale": 0.0}, "--reward-scale > 0"),
        ({"reward_scale": -1.0}, "--reward-scale > 0"),
    ],
)
def test_invalid_flags_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, flags, expected):
    assert ddpl_mamujoco.main(ddpl_mamujoco.Args(runs_dir=str(tmp_path / "runs"), **flags)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not (tmp_path / "runs").exists()


def test_missing_mujoco_names_the_pip_install_command(tmp_path):
    """Without mujoco (blocked here), gymnasium raises DependencyNotInstalled at import: one line, exit 2."""
    code = "import sys, runpy\nsys.modules['mujoco'] = None\ndel sys.argv[0]\n"
    code += "runpy.run_path(sys.argv[0], run_name='__main__')"
    res = subprocess.run(
        [sys.executable, "-c", code, SCRIPT, "--runs-dir", str(tmp_path / "runs")], capture_output=True, text=True
    )
    assert res.returncode == 2 and res.stderr.startswith("error: MaMuJoCo unavailable (pip install gymnasium-robotics")
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Env glue
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("local_obs", [True, False], ids=["local-obs", "full-obs"])
@pytest.mark.parametrize("task", ddpl_mamujoco.PAPER_TASKS)
def test_fast_step_and_gather_equal_the_library(task, local_obs):
    """MaMuJoCo.step + observe against the library's own ParallelEnv.step (obsk.build_obs observations) in lockstep
    from the same seed, across terminations (Ant falls under random actions), truncations (a 100-step limit) and
    the resets after them: same per-agent observations (exactly), state, reward, terminated and truncated."""
    ours = ddpl_mamujoco.MaMuJoCo(task, 1, local_obs, max_episode_steps=100)
    lib = ddpl_mamujoco.make_library_env(task, max_episode_steps=100)
    rng = np.random.default_rng(0)
    lib_obs, _ = lib.reset(seed=0)
    state = ours.reset([0])[0]
    ends = {"terminal": 0, "truncated": 0}
    for _ in range(300):
        if local_obs:  # the gather reproduces MaMuJoCo's per-agent observations
            gathered = np.asarray(ours.observe(state))
            for i, a in enumerate(lib.possible_agents):
                d = len(lib_obs[a])
                np.testing.assert_array_equal(gathered[i, :d], lib_obs[a].astype(np.float32))
                np.testing.assert_array_equal(gathered[i, d:], 0.0)  # padding
        else:  # HARL: the full observation (the library's state()) plus a one-hot id
            want = np.concatenate([np.tile(lib.state(), (ours.num_agents, 1)), np.eye(ours.num_agents)], axis=1)
            np.testing.assert_array_equal(np.asarray(ours.observe(state)), want.astype(np.float32))
        action = rng.uniform(-1.0, 1.0, (1, ours.num_agents, ours.act_dim)).astype(np.float32)
        out = ours.step(action)
        lib_obs, reward, terminated, truncated, _ = lib.step(
            lib.map_global_action_to_local_actions(ours.to_env_action(action)[0])
        )
        a0 = lib.possible_agents[0]
        np.testing.assert_array_equal(out["next_state"][0], lib.state().astype(np.float32))
        assert out["reward"][0] == np.float32(reward[a0])
        assert out["terminal"][0] == terminated[a0] and out["done"][0] == (terminated[a0] or truncated[a0])
        ends["terminal"] += terminated[a0]
        ends["truncated"] += truncated[a0] and not terminated[a0]
        if out["done"][0]:  # both reset with the env's own RNG: the next episode starts in the same state
            lib_obs, _ = lib.reset()
            assert not np.array_equal(out["state"][0], out["next_state"][0])
        state = out["state"][0]
    assert ends["truncated"] >= 1
    assert (ends["terminal"] >= 1) == task.startswith("Ant")  # HumanoidStandup never terminates


def test_one_joint_per_agent_partitions_follow_harl():
    ant = ddpl_mamujoco.MaMuJoCo("Ant-8x1", 1, True)
    lib = ant.envs[0]
    assert [p[0].label for p in lib.agent_action_partitions] == list(ddpl_mamujoco.ONE_JOINT_PER_AGENT["Ant-8x1"][1])
    assert [len(lib._get_obs()[a]) for a in lib.possible_agents] == [29, 32] * 4  # docs/environments.md
    hs = ddpl_mamujoco.MaMuJoCo("HumanoidStandup-17x1", 1, True)
    assert (hs.num_agents, hs.act_dim, hs.state_dim, hs.obs_dim) == (17, 1, 348, 92)
    np.testing.assert_allclose(hs.high, 0.4)
    assert sorted(hs.act_target) == list(range(17))  # every joint driven by exactly one agent
    full = ddpl_mamujoco.MaMuJoCo("HumanoidStandup-17x1", 1, False)
    assert full.obs_dim == 348 + 17


def test_to_env_action_is_affine_and_drops_padding():
    env = ddpl_mamujoco.MaMuJoCo("HumanoidStandup-9|8", 1, False)  # 9 and 8 joints: agent 1 has one padded dim
    assert env.act_dim == 9 and len(env.act_target) == 17
    action = np.ones((2, 9))
    action[1, 8] = -1.0  # the padded dim: ignored
    np.testing.assert_allclose(env.to_env_action(action), 0.4)
    np.testing.assert_allclose(env.to_env_action(np.zeros((2, 9))), 0.0, atol=1e-7)
    np.testing.assert_allclose(env.to_env_action(-np.ones((2, 9))), -0.4)


def test_local_obs_refused_where_the_library_builder_transforms_values():
    with pytest.raises(ValueError, match="drop --local-obs"):
        ddpl_mamujoco.MaMuJoCo("Reacher-2x1", 1, True)
    ddpl_mamujoco.MaMuJoCo("Reacher-2x1", 1, False)  # the full observation works everywhere


def test_valid_tasks_list_the_paper_tasks_and_build():
    tasks = ddpl_mamujoco.valid_tasks()
    assert set(ddpl_mamujoco.PAPER_TASKS) <= set(tasks)
    for task in tasks:
        if "<" not in task:
            env = ddpl_mamujoco.MaMuJoCo(task, 1, False)
            assert env.num_agents >= 2 and np.asarray(env.observe(jnp.zeros(env.state_dim))).shape[0] == env.num_agents
    assert ddpl_mamujoco.known_partition("ManySegmentAnt-2x3") and not ddpl_mamujoco.known_partition("Ant-3x3")


def test_buffer_add_is_circular():
    buffer = ddpl_mamujoco.buffer_init(size=5, N=2, S=3, A=1)
    for it in range(3):  # 3 inserts of 2 transitions into 5 rows: rows 0-1, 2-3, then 4 and 0
        value = 10.0 * it + jnp.arange(2.0)
        tr = {
            k: jnp.broadcast_to(value.reshape((2,) + (1,) * (v.ndim - 1)), (2,) + v.shape[1:])
            for k, v in buffer.items()
        }
        buffer = ddpl_mamujoco.buffer_add(buffer, tr, it)
    np.testing.assert_array_equal(np.asarray(buffer["reward"]), [21.0, 1.0, 10.0, 11.0, 20.0])
    np.testing.assert_array_equal(np.asarray(buffer["next_state"][:, 2]), [21.0, 1.0, 10.0, 11.0, 20.0])


@pytest.mark.slow
def test_critic_inputs_stay_bounded_over_random_episodes():
    """The critics see symlog(state) by default (--symlog-obs). Over 500 random steps in 4 envs (falls and resets
    included) the raw state reaches about 16 on Ant and 1,900 on HumanoidStandup (contact forces, inertias); after
    symlog every entry stays below 8 in absolute value (2.8 and 7.5 measured)."""
    assert ddpl_mamujoco.Args().symlog_obs
    for task, raw_max in (("Ant-2x4", 10.0), ("HumanoidStandup-17x1", 1000.0)):
        env, rng = ddpl_mamujoco.MaMuJoCo(task, 4, False), np.random.default_rng(0)
        env.reset([0, 1, 2, 3])
        states = np.stack([env.step(rng.uniform(-1.0, 1.0, (4, env.num_agents, env.act_dim)))["next_state"]
                           for _ in range(500)])  # fmt: skip
        critic_input = np.asarray(ddpl_mamujoco.symlog(states))
        assert np.abs(states).max() > raw_max and np.abs(critic_input).max() < 8.0, task
