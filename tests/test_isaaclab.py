"""ddpl_isaaclab.py without Isaac Sim: the env adapter (dicts of torch tensors <-> stacked JAX arrays, auto-reset,
termination vs time-out, bool handling) and a short training run against tests/isaaclab_standin.py, the masked TD
error of timed-out transitions, the device check, and the exit-2 message where IsaacLab is not installed. A training
run is main(args, env) with the stand-in as env."""

import csv
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddpl_isaaclab as m

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "ddpl_isaaclab.py")
SUMMARY_KEYS = {"script", "env_id", "total_timesteps", "num_seeds", "final_eval_return", "best_eval_return"}
SUMMARY_KEYS |= {"wall_time_s", "sps"}
# 2 seeds x 3 envs, 2 chunks of 12 steps per seed (4 iterations), updates from the second iteration
TINY = dict(num_seeds=2, num_envs=3, total_timesteps=24, eval_every=12, learning_starts=3, batch_size=8)
TINY |= dict(hidden_size=16, num_diffusion_steps=3, buffer_size=9, updates_per_iteration=2)


def standin(**kwargs):
    torch = pytest.importorskip("torch")  # the CI's second venv (.ci/run: requirements-isaaclab.txt + torch) has torch
    from isaaclab_standin import StandInMARLEnv

    return torch, StandInMARLEnv(**kwargs)


def test_missing_isaac_sim_is_one_line_exit_2(tmp_path):
    if importlib.util.find_spec("isaaclab"):
        pytest.skip("IsaacLab is installed here")
    res = subprocess.run([sys.executable, SCRIPT, "--num-envs", "8"], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert res.stderr.startswith("error: IsaacLab is not installed here (missing: ")
    assert "isaaclab" in res.stderr and "pip install -r requirements-isaaclab.txt" in res.stderr
    assert not (tmp_path / "runs").exists()  # nothing written


def test_jax_does_not_preallocate_the_gpu():
    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"


def test_adapter_reset_pads_and_stacks():
    torch, env = standin(num_envs=6)
    adapter = m.IsaacAdapter(env, num_seeds=2)
    assert (adapter.num_agents, adapter.num_envs, adapter.obs_dim, adapter.act_dim) == (2, 3, 7, 3)
    out = adapter.reset()
    torch_obs = env._obs()
    assert out["obs"].shape == (2, 3, 2, 7) and out["state"].shape == (2, 3, 6) and adapter.state_dim == 6
    obs = np.asarray(out["obs"]).reshape(6, 2, 7)
    np.testing.assert_array_equal(obs[:, 0], torch_obs["right_hand"].numpy())
    np.testing.assert_array_equal(obs[:, 1, :5], torch_obs["left_hand"].numpy())
    assert not obs[:, 1, 5:].any()  # zero padding of the smaller observation
    np.testing.assert_array_equal(np.asarray(out["state"]).reshape(6, 6), env.state().numpy())
    with pytest.raises(ValueError):
        m.IsaacAdapter(env, num_seeds=4)  # 6 envs do not split into 4 seeds


def test_dlpack_shares_memory():
    torch, _ = standin()
    t = torch.arange(64, dtype=torch.float32).reshape(16, 4)
    x = m.to_jax(t)
    assert x.unsafe_buffer_pointer() == t.data_ptr()  # no copy on the same device
    flags = m.to_jax(torch.tensor([True, False, True]))
    assert flags.dtype == jnp.float32 and flags.tolist() == [1.0, 0.0, 1.0]


def test_step_actions_rewards_termination_and_time_out():
    torch, env = standin(num_envs=4, max_episode_length=6, bound=3.0)
    adapter = m.IsaacAdapter(env, num_seeds=2)
    adapter.reset()
    # env 0 leaves the bound (terminated), env 1 reaches the time limit, env 2 both, env 3 neither
    env.pos = torch.tensor([[2.9, 0.0], [0.0, 0.0], [2.9, 0.0], [0.1, 0.2]])
    env.t = torch.tensor([0, 5, 5, 0])
    action = jnp.zeros((2, 2, 2, 3)).at[..., 0, 0].set(1.0).at[..., 1, 1].set(-0.7).at[..., 1, 2].set(0.9)
    out = adapter.step(action)
    np.testing.assert_array_equal(env.last_actions["right_hand"].numpy(), np.asarray(action).reshape(4, 2, 3)[:, 0])
    np.testing.assert_array_equal(env.last_actions["left_hand"].numpy(), np.asarray(action).reshape(4, 2, 3)[:, 1, :2])
    assert np.asarray(out["terminal"]).ravel().tolist() == [1.0, 0.0, 1.0, 0.0]
    assert np.asarray(out["truncated"]).ravel().tolist() == [0.0, 1.0, 0.0, 0.0]  # termination wins over a time-out
    assert np.asarray(out["done"]).ravel().tolist() == [1.0, 1.0, 1.0, 0.0]
    want = 2.0 * np.exp(-np.linalg.norm(env.last_pos.numpy() - env.goal.numpy(), axis=1))
    np.testing.assert_allclose(np.asarray(out["reward"]).ravel(), want, rtol=1e-6)
    # auto-reset: what comes back for done envs is the next episode's start (t = 0), for env 3 the true s'
    state = np.asarray(out["state"]).reshape(4, 6)
    assert state[:, 4].tolist() == [0.0, 0.0, 0.0, 1.0]
    np.testing.assert_allclose(state[3, :2], env.last_pos.numpy()[3])
    assert not np.allclose(state[0, :2], env.last_pos.numpy()[0])


def tiny_args(tmp_path, **overrides):
    return m.Args(runs_dir=str(tmp_path / "runs"), **(TINY | overrides))


def test_timed_out_transitions_carry_no_td_error(tmp_path):
    """Rows flagged truncated leave the critics untouched (their s' is the next episode's); the actors still learn."""
    _, env = standin(num_envs=3)
    adapter = m.IsaacAdapter(env, num_seeds=1)
    first = adapter.reset()
    args = tiny_args(tmp_path, num_seeds=1, learning_starts=0, updates_per_iteration=1)
    train = m.make_train(args, adapter)
    rng = np.random.default_rng(0)
    transitions = {"obs": first["obs"][0], "state": first["state"][0], "next_obs": first["obs"][0]}
    transitions |= {"next_state": first["state"][0], "action": jnp.asarray(rng.uniform(-1, 1, (3, 2, 3)), jnp.float32)}
    transitions |= {"reward": jnp.ones(3), "terminal": jnp.zeros(3)}
    changed = {}
    for flag in (0.0, 1.0):
        rs = train.init(0)
        new, metrics, updated = jax.jit(train.learn)(rs, transitions | {"truncated": jnp.full(3, flag)}, 0)
        assert float(updated) == 1.0 and np.isfinite(np.asarray(metrics)).all()
        changed[flag] = {
            k: any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(rs["learner"][k]),
                                                          jax.tree.leaves(new["learner"][k]), strict=True))
            for k in ("critic", "actor")
        }  # fmt: skip
    assert changed[0.0] == {"critic": True, "actor": True}
    assert changed[1.0] == {"critic": False, "actor": True}


def test_device_check():
    _, env = standin(device="cuda:0")
    if jax.default_backend() == "gpu":
        assert m.check_devices(env) is None
    else:
        assert "jax[cuda12]" in m.check_devices(env)
    assert m.check_devices(standin(device="cpu")[1]) is None


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    _, env = standin(num_envs=6, max_episode_length=4)
    assert m.main(tiny_args(tmp, save_model=True), env) == 0
    (run_dir,) = (tmp / "runs").iterdir()
    return run_dir, env


def read_rows(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_train_writes_a_complete_run_folder(run):
    run_dir, env = run
    for name in ("config.json", "metrics.csv", "summary.json", "learning_curve.png", "model.flax"):
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary) and summary["script"] == "ddpl_isaaclab.py"
    assert summary["env_id"] == "IsaacLab_Isaac-Shadow-Hand-Over-Direct-v0" and summary["total_timesteps"] == 24
    assert summary["num_seeds"] == 2 and len(summary["final_eval_return"]["per_seed"]) == 2
    rows = read_rows(run_dir)
    assert list(rows[0]) == ["global_step", "seed", *m.METRICS, "sps", "wall_time"]
    assert [(r["global_step"], r["seed"]) for r in rows] == [("12", "0"), ("12", "1"), ("24", "0"), ("24", "1")]
    assert summary["final_eval_return"]["per_seed"] == [float(r["episodic_return"]) for r in rows[2:]]
    for r in rows:
        assert np.isfinite(float(r["critic_loss"])) and np.isfinite(float(r["actor_loss"]))
        assert 0.25 <= float(r["max_weight"]) <= 1.0  # normalised over M = 4
        assert 1 <= float(r["episode_length"]) <= 4 and 0.0 < float(r["episodic_return"]) <= 8.0
        assert r["train_return"] != ""  # 4-step episodes: every chunk of 4 iterations finishes some
    # 2 chunks x (4 training steps + at most 4 evaluation steps); one reset at the start and two per chunk
    assert 8 < env.num_steps <= 16 and env.num_resets == 5


def test_eval_only_plays_the_checkpoint(run, tmp_path):
    run_dir, _ = run
    _, env = standin(num_envs=6, max_episode_length=4)
    args = tiny_args(tmp_path, checkpoint=str(run_dir / "model.flax"), eval_only=True, hidden_size=99)
    assert m.main(args, env) == 0  # the architecture (hidden size 16) comes from the checkpoint
    (out,) = (tmp_path / "runs").iterdir()
    rows = read_rows(out)
    assert [(r["global_step"], r["seed"]) for r in rows] == [("24", "0"), ("24", "1")]
    assert json.loads((out / "summary.json").read_text())["eval_only"] is True


def test_bad_input_exits_2_before_writing(tmp_path, capsys):
    _, env = standin(num_envs=6)
    assert m.main(tiny_args(tmp_path, num_action_samples=1), env) == 2
    assert m.main(tiny_args(tmp_path, num_envs=2), env) == 2  # the env holds 3 per seed
    assert not (tmp_path / "runs").exists()
    assert capsys.readouterr().err.count("error: ") == 2
