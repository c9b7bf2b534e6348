"""ddpl_mpe.py: the CLI contract (run folder, eval-only reproduction, determinism, bad input) and the env glue."""

import csv
import json
import os
import subprocess
import sys

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
SUMMARY_KEYS |= {"wall_time_s", "sps"}
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
    """Two identical tiny training runs with 2 seeds, side by side (one core each); the first saves its model and
    probes its policies (which must not change training: test_same_seed_same_metrics)."""
    tmp = tmp_path_factory.mktemp("train")
    procs = [
        start_cli(*TINY, "--save-model", "--probe-every", "400", "--runs-dir", str(tmp / "a"), cwd=tmp),
        start_cli(*TINY, "--runs-dir", str(tmp / "b"), cwd=tmp),
    ]
    for proc in procs:
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr
    return [next((tmp / name).iterdir()) for name in ("a", "b")]


@pytest.fixture(scope="module")
def trained(runs):
    return runs[0]


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
    assert summary["final_eval_return"]["per_seed"] == final
    # updates ran in both chunks (learning starts at 200) and the ISSM weights are normalised over M = 4
    for r in rows:
        assert np.isfinite(float(r["critic_loss"])) and np.isfinite(float(r["actor_loss"]))
        assert 0.25 <= float(r["max_weight"]) <= 1.0 and 0.25 <= float(r["weight_ess"]) <= 1.0
        assert float(r["eta"]) == 1.0  # fixed eta without --target-ess
        assert -60.0 < float(r["episodic_return"]) < 0.0  # MPE rewards are negative distances
        # the discounted return is a discounted sum of the same negative rewards: between return and gamma^25 return
        assert float(r["episodic_return"]) < float(r["disc_return"]) < 0.99**25 * float(r["episodic_return"])
        assert np.isfinite(float(r["q_first"]))


def test_probe_records_the_action_distribution(trained):
    probes = np.load(trained / "probes.npz")
    assert list(probes["steps"]) == [0, 400, 800]
    actions = probes["actions"]  # (probe, seed, agent, sample, action dim)
    assert actions.shape == (3, 2, 2, ddpl_mpe.PROBE_SAMPLES, 15) and np.abs(actions).max() <= 1.0
    assert not np.array_equal(actions[0], actions[-1])  # the policies learned in between
    assert (trained / "probe.png").is_file()


def test_eval_only_reproduces_final_eval(trained, tmp_path):
    res = run_cli(
        "--checkpoint", str(trained / "model.flax"), "--eval-only", "--seed", "3", "--num-eval-episodes", "5",
        "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    rows = read_rows(run_dir)
    want = {r["seed"]: r["episodic_return"] for r in read_rows(trained) if r["global_step"] == "800"}
    assert {r["seed"]: r["episodic_return"] for r in rows} == want  # exact equality, as text
    assert all(r["global_step"] == "800" for r in rows)
    summary = json.loads((run_dir / "summary.json").read_text())
    trained_summary = json.loads((trained / "summary.json").read_text())
    assert summary["final_eval_return"] == trained_summary["final_eval_return"]
    assert SUMMARY_KEYS <= set(summary) and summary["eval_only"] is True


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


def test_sharded_seeds_match_the_unsharded_run(runs, seed_blocks):
    run_dir, stdout = seed_blocks["two_devices"]
    assert "seeds per device: {'cpu:0': [3], 'cpu:1': [4]}" in stdout  # one seed lane on each device
    assert "runner state on 2 device(s)" in stdout
    assert json.loads((run_dir / "summary.json").read_text())["num_devices"] == 2
    # the same per-seed metrics as the one-device run (runs[1], the same flags), up to float rounding
    np.testing.assert_allclose(numeric_rows(read_rows(run_dir)), numeric_rows(read_rows(runs[1])), rtol=1e-5)


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


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--env-id", "MPE_simple_nonsense_v9"], "valid ids: MPE_simple_v3"),
        (["--env-id", "SMAX"], "MPE_simple_reference_v3"),
        (["--num-action-samples", "1"], "--num-action-samples must be >= 2"),
        (["--eval-only"], "--eval-only and --checkpoint"),
        (["--checkpoint", "model.flax"], "--eval-only and --checkpoint"),
        (["--noise-schedule", "quadratic"], "Expected one of ('linear', 'cosine', 'vp')"),
        (["--num-seeds", "two"], "--num-seeds"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, flags, expected):
    res = run_cli(*flags, "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and expected in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "runs").exists()  # nothing written


def test_valid_env_ids_are_the_continuous_mpe_scenarios():
    ids = ddpl_mpe.valid_env_ids()
    assert "MPE_simple_reference_v3" in ids and "MPE_simple_spread_v3" in ids
    assert all(i.startswith("MPE_") for i in ids) and "SMAX" not in ids


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
