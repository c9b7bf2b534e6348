"""ddpl_mpe.py: the CLI contract (run folder, evaluation of a saved model, determinism, bad input) and the env glue."""

import csv
import json
import os
import subprocess
import sys
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddpl_mpe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a tiny budget: 4 envs, 2 chunks of 400 steps, updates from step 200, a 500-row buffer (it wraps around)
TINY = [
    "--total-timesteps", "800", "--eval-every", "400", "--num-envs", "4", "--learning-starts", "200",
    "--batch-size", "32", "--hidden-size", "32", "--num-diffusion-steps", "5", "--num-eval-episodes", "5",
    "--buffer-size", "500", "--num-seeds", "2", "--seed", "3",
]  # fmt: skip
SUMMARY_KEYS = {"script", "env_id", "total_timesteps", "num_seeds", "final_eval_return", "best_eval_return"}
SUMMARY_KEYS |= {"wall_time_s", "sps", "diverged_seeds"}
COLUMNS = ["global_step", "seed", "episodic_return", "train_return", "q_first", "disc_return", "critic_loss"]
COLUMNS += ["actor_loss", "q_mean", "max_weight", "weight_ess", "eta", "sps", "wall_time"]


def run_cli(*flags, cwd):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "ddpl_mpe.py"), *flags],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def read_rows(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def start_cli(*flags, cwd):
    cmd = [sys.executable, os.path.join(ROOT, "ddpl_mpe.py"), *flags]
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two identical tiny training runs with 2 seeds, side by side (one core each); the first saves its model (which
    must not change training: test_same_seed_same_metrics)."""
    tmp = tmp_path_factory.mktemp("train")
    procs = [
        start_cli(*TINY, "--save-model", "--runs-dir", str(tmp / "a"), cwd=tmp),
        start_cli(*TINY, "--runs-dir", str(tmp / "b"), cwd=tmp),
    ]
    for proc in procs:
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr
    return [next((tmp / name).iterdir()) for name in ("a", "b")]


@pytest.fixture(scope="module")
def trained(runs):
    return runs[0]


@pytest.mark.slow
def test_run_folder_is_complete(trained):
    for name in ("config.json", "metrics.csv", "summary.json", "learning_curve.png", "model.flax"):
        assert (trained / name).is_file(), name
    summary = json.loads((trained / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["script"] == "ddpl_mpe.py" and summary["env_id"] == "MPE_simple_reference_v3"
    assert summary["num_seeds"] == 2 and summary["total_timesteps"] == 800
    for key in ("final_eval_return", "best_eval_return"):
        assert set(summary[key]) == {"mean", "std", "per_seed"} and len(summary[key]["per_seed"]) == 2
    rows = read_rows(trained)
    assert list(rows[0]) == COLUMNS
    assert [(int(r["global_step"]), int(r["seed"])) for r in rows] == [(400, 3), (400, 4), (800, 3), (800, 4)]
    final = [float(r["episodic_return"]) for r in rows if r["global_step"] == "800"]
    assert summary["final_eval_return"]["per_seed"] == final and summary["diverged_seeds"] == []
    # updates ran in both chunks (learning starts at 200) and the ISSM weights are normalised over M = 4
    for r in rows:
        assert np.isfinite(float(r["critic_loss"])) and np.isfinite(float(r["actor_loss"]))
        assert 0.25 <= float(r["max_weight"]) <= 1.0 and 0.25 <= float(r["weight_ess"]) <= 1.0
        assert float(r["eta"]) == 1.0  # fixed eta without --target-ess
        assert -60.0 < float(r["episodic_return"]) < 0.0  # MPE rewards are negative distances
        # the discounted return is a discounted sum of the same negative rewards: between return and gamma^25 return
        assert float(r["episodic_return"]) < float(r["disc_return"]) < 0.99**25 * float(r["episodic_return"])
        assert np.isfinite(float(r["q_first"]))


@pytest.mark.slow
def test_evaluate_tool_reproduces_the_final_evaluation(trained):
    """benchmarks/evaluate.py on the saved model: the training run's last evaluation, bit for bit (compared as text)."""
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "evaluate.py"), str(trained), "--json"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["script"] == "ddpl_mpe.py" and out["global_step"] == 800 and out["seeds"] == [3, 4]
    last = [r for r in read_rows(trained) if r["global_step"] == "800"]
    for name in ("episodic_return", "disc_return"):
        assert [repr(v) for v in out[name]] == [r[name] for r in last], name


def test_evaluate_tool_refuses_what_is_not_a_model(tmp_path):
    (tmp_path / "model.flax").write_bytes(b"not msgpack")
    tool = os.path.join(ROOT, "benchmarks", "evaluate.py")
    for target in (tmp_path / "missing", tmp_path):
        res = subprocess.run([sys.executable, tool, str(target)], capture_output=True, text=True, timeout=300)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and res.stderr.startswith("error: "), res.stderr


@pytest.mark.slow
def test_same_seed_same_metrics(runs):
    def strip(rows):
        return [{k: v for k, v in r.items() if k not in ("sps", "wall_time")} for r in rows]

    assert strip(read_rows(runs[1])) == strip(read_rows(runs[0]))
    assert not (runs[1] / "model.flax").exists()


def tiny(seed, num_seeds):
    """TINY with another seed block."""
    flags = list(TINY)
    flags[flags.index("--seed") + 1], flags[flags.index("--num-seeds") + 1] = str(seed), str(num_seeds)
    return flags


TWO_DEVICES = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="module")
def seed_blocks(tmp_path_factory):
    """TINY's seeds 3 and 4 trained three more ways, side by side: split over two (forced) CPU devices, and as two
    separate one-seed processes (--seed 3 and --seed 4). Returns {name: (run folder, stdout)}."""
    tmp = tmp_path_factory.mktemp("scale")
    flags = {"two_devices": tiny(3, 2), "seed3": tiny(3, 1), "seed4": tiny(4, 1)}
    procs = {}
    for name, f in flags.items():
        cmd = [sys.executable, os.path.join(ROOT, "ddpl_mpe.py"), *f, "--runs-dir", str(tmp / name)]
        env = TWO_DEVICES if name == "two_devices" else None
        procs[name] = subprocess.Popen(cmd, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr
        out[name] = (next((tmp / name).iterdir()), stdout)
    return out


def numeric_rows(rows):
    return np.array([[float(r[c]) for c in COLUMNS if c not in ("sps", "wall_time")] for r in rows])


@pytest.mark.slow
def test_sharded_seeds_match_the_unsharded_run(runs, seed_blocks):
    run_dir, stdout = seed_blocks["two_devices"]
    assert "seeds per device: {'cpu:0': [3], 'cpu:1': [4]}" in stdout  # one seed lane on each device
    assert "runner state on 2 device(s)" in stdout
    assert json.loads((run_dir / "summary.json").read_text())["num_devices"] == 2
    # the same per-seed metrics as the one-device run (runs[1], the same flags), up to float rounding
    np.testing.assert_allclose(numeric_rows(read_rows(run_dir)), numeric_rows(read_rows(runs[1])), rtol=1e-5)


@pytest.mark.slow
def test_seed_blocks_of_separate_processes_merge_into_the_one_process_table(runs, seed_blocks, tmp_path):
    def aggregate(*run_dirs, out):
        cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "aggregate.py"), *map(str, run_dirs)]
        res = subprocess.run([*cmd, "--out-dir", str(out)], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        with open(out / "table.csv", newline="") as f:
            return (out / "table.md").read_text(), list(csv.DictReader(f))

    merged_md, merged = aggregate(seed_blocks["seed3"][0], seed_blocks["seed4"][0], out=tmp_path / "merged")
    one_md, one = aggregate(runs[1], out=tmp_path / "one")
    assert merged_md == one_md
    assert (merged[0]["seeds"], merged[0]["num_runs"], one[0]["num_runs"]) == ("3 4", "2", "1")
    for key in ("best_mean", "best_std", "final_mean", "final_std"):
        assert float(merged[0][key]) == pytest.approx(float(one[0][key]), rel=1e-6), key
    summary = json.loads((runs[1] / "summary.json").read_text())  # the script's own Table 1 statistic
    assert float(one[0]["best_mean"]) == pytest.approx(summary["best_eval_return"]["mean"], rel=1e-9)
    assert (tmp_path / "merged" / "learning_curves.png").stat().st_size > 0


def test_num_seeds_must_be_a_multiple_of_the_devices(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "ddpl_mpe.py"), *tiny(0, 3), "--runs-dir", str(tmp_path / "runs")]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=TWO_DEVICES)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "--num-seeds 3 is not a multiple of the 2 local cpu devices" in lines[0], res.stderr
    assert not (tmp_path / "runs").exists()


TYRO_ERRORS = {  # what tyro checks itself: flags -> the text its error box must hold
    ("--env-id", "SMAX"): "Expected one of ('MPE_simple_reference_v3', 'MPE_simple_v3'",
    ("--noise-schedule", "quadratic"): "Expected one of ('linear', 'cosine', 'vp')",
    ("--num-seeds", "two"): "--num-seeds",
    ("--checkpoint", "model.flax"): "Unrecognized options: --checkpoint",
}


def test_tyro_rejects_bad_input_with_exit_code_2(tmp_path):
    procs = {flags: start_cli(*flags, "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path) for flags in TYRO_ERRORS}
    for flags, proc in procs.items():  # side by side: each start imports JAX and JaxMARL
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 2, (flags, stderr)
        assert TYRO_ERRORS[flags] in " ".join(ln.strip("│ ") for ln in stderr.splitlines()), stderr
        assert "Traceback" not in stderr
    assert not (tmp_path / "runs").exists()  # nothing written


@pytest.mark.parametrize(
    "flags, expected",
    [
        ({"num_action_samples": 1}, "--num-action-samples must be >= 2"),
        ({"eval_every": 10, "num_envs": 20}, "need --num-envs <= --eval-every <= --total-timesteps"),
        ({"issm_batch_size": 999}, "--issm-batch-size must be 0"),
        ({"learning_rate_end": 0.0}, "--learning-rate and --learning-rate-end > 0"),
    ],
)
def test_invalid_flags_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, flags, expected):
    assert ddpl_mpe.main(ddpl_mpe.Args(runs_dir=str(tmp_path / "runs"), **flags)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not (tmp_path / "runs").exists()


def test_one_validate_error_through_the_cli(tmp_path):
    res = run_cli("--num-action-samples", "1", "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith("error: --num-action-samples")
    assert "Traceback" not in res.stderr and not (tmp_path / "runs").exists()


def test_env_ids_are_the_continuous_mpe_scenarios():
    """--env-id's choices are exactly JaxMARL's registered MPE scenarios that build with continuous actions."""
    import jaxmarl
    from jaxmarl.registration import registered_envs

    def continuous(env_id):
        try:
            return env_id.startswith("MPE_") and bool(jaxmarl.make(env_id, action_type="Continuous"))
        except Exception:  # e.g. the facmac scenarios: continuous already, but they reject the keyword
            return False

    assert set(typing.get_args(ddpl_mpe.ENV_IDS)) == {e for e in registered_envs if continuous(e)}
    assert typing.get_args(ddpl_mpe.ENV_IDS)[0] == ddpl_mpe.Args().env_id == "MPE_simple_reference_v3"


# ---------------------------------------------------------------------------------------------------------------------
# Env glue and replay buffer
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env():
    return ddpl_mpe.MPEArrays("MPE_simple_reference_v3")


def test_env_shapes_and_action_box(env):
    assert (env.num_agents, env.obs_dim, env.act_dim, env.episode_length) == (2, 21, 15, 26)
    np.testing.assert_array_equal(np.asarray(env.low[0]), 0.0)
    np.testing.assert_array_equal(np.asarray(env.high[0]), 1.0)


def test_step_keeps_terminal_observation_and_matches_env_step(env):
    """Through a whole episode: MPEArrays.step equals env.step (auto-reset included) for what the policy sees next,
    while next_obs is step_env's true successor, also on the last step; actions map [-1, 1] -> [0, 1] affinely."""
    key = jax.random.PRNGKey(0)
    obs, state = env.reset(key)
    step = jax.jit(env.step)
    raw_step, raw_step_env = jax.jit(env.env.step), jax.jit(env.env.step_env)
    for t in range(env.episode_length):
        key, k_act, k_step = jax.random.split(key, 3)
        action = jax.random.uniform(k_act, (2, 15), minval=-1.0, maxval=1.0)
        env_action = {a: (action[i] + 1.0) / 2.0 for i, a in enumerate(env.agents)}
        next_obs, obs_seen, new_state, reward, done = step(k_step, state, action)
        ref_obs, ref_state, ref_reward, ref_dones, _ = raw_step(k_step, state, env_action)
        true_next, *_ = raw_step_env(jax.random.split(k_step)[0], state, env_action)
        np.testing.assert_allclose(np.asarray(obs_seen), np.asarray(env.stack_obs(ref_obs)), atol=1e-6)
        np.testing.assert_allclose(np.asarray(next_obs), np.asarray(env.stack_obs(true_next)), atol=1e-6)
        np.testing.assert_allclose(np.asarray(reward), [float(ref_reward[a]) for a in env.agents], atol=1e-6)
        assert bool(done) == bool(ref_dones["__all__"]) == (t == env.episode_length - 1)
        for x, y in zip(jax.tree.leaves(new_state), jax.tree.leaves(ref_state), strict=True):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
        state = new_state
    # on the last step the true successor is not the reset observation the policy sees next
    assert not np.allclose(np.asarray(next_obs), np.asarray(obs_seen))
    assert int(state.step) == 0


def test_buffer_add_is_circular():
    buffer = ddpl_mpe.buffer_init(size=5, N=2, D=3, A=1)
    for it in range(3):  # 3 inserts of 2 transitions into 5 rows: rows 0-1, 2-3, then 4 and 0
        value = 10.0 * it + jnp.arange(2.0)  # transition j of insert it carries 10 it + j everywhere
        tr = {
            k: jnp.broadcast_to(value.reshape((2,) + (1,) * (v.ndim - 1)), (2,) + v.shape[1:])
            for k, v in buffer.items()
        }
        buffer = ddpl_mpe.buffer_add(buffer, tr, it)
    np.testing.assert_array_equal(np.asarray(buffer["done"]), [21.0, 1.0, 10.0, 11.0, 20.0])
    np.testing.assert_array_equal(np.asarray(buffer["obs"][:, 1, 2]), [21.0, 1.0, 10.0, 11.0, 20.0])


def test_critic_inputs_stay_bounded_over_random_episodes():
    """The critics' input on MPE, all agents' observations concatenated, needs no scaling: over 4 whole random
    episodes in 16 envs every entry stays within 5 in absolute value (2.7 measured), and it is not all small."""
    env = ddpl_mpe.MPEArrays("MPE_simple_reference_v3")
    obs, state = jax.vmap(env.reset)(jax.random.split(jax.random.PRNGKey(0), 16))

    def step(carry, key):
        obs, state = carry
        k_act, k_env = jax.random.split(key)
        action = jax.random.uniform(k_act, (16, env.num_agents, env.act_dim), minval=-1.0, maxval=1.0)
        next_obs, obs, state, _, _ = jax.vmap(env.step)(jax.random.split(k_env, 16), state, action)
        return (obs, state), next_obs

    keys = jax.random.split(jax.random.PRNGKey(1), 4 * env.episode_length)
    _, next_obs = jax.jit(lambda c: jax.lax.scan(step, c, keys))((obs, state))
    critic_input = np.asarray(next_obs).reshape(-1, env.num_agents * env.obs_dim)
    assert np.abs(critic_input).max() < 5.0 and np.abs(critic_input).max() > 1.0
