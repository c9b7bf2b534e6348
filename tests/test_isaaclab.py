"""ddpl_isaaclab.py without Isaac Sim: the env adapter (dicts of torch tensors <-> stacked JAX arrays, auto-reset,
termination vs time-out, bool handling) and short training runs against tests/isaaclab_standin.py (run folder, a seed
that diverges, benchmarks/evaluate.py replaying the last evaluation), the masked TD error of timed-out transitions,
the device check, and the exit-2 messages where IsaacLab is not installed. A training run is main(args, env) with the
stand-in as env; the evaluate tool meets the stand-in in place of isaac_sim()."""

import contextlib
import csv
import importlib.util
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddpl_isaaclab as m

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "ddpl_isaaclab.py")
TOOL = os.path.join(ROOT, "benchmarks", "evaluate.py")
SUMMARY_KEYS = {"script", "env_id", "total_timesteps", "num_seeds", "final_eval_return", "best_eval_return"}
SUMMARY_KEYS |= {"wall_time_s", "sps", "diverged_seeds", "jax_backend", "train_sps", "train_time_s", "env_time_s"}
# 2 seeds x 3 envs, 2 chunks of 12 steps per seed (4 iterations), updates from the second iteration
TINY = dict(num_seeds=2, num_envs=3, total_timesteps=24, eval_every=12, learning_starts=3, batch_size=8)
TINY |= dict(hidden_size=16, num_diffusion_steps=3, buffer_size=9, updates_per_iteration=2)


def standin(**kwargs):
    torch = pytest.importorskip("torch")  # the CI's second venv (.ci/run: requirements-isaaclab.txt + torch) has torch
    from isaaclab_standin import StandInMARLEnv

    class Recording(StandInMARLEnv):
        """Keeps the generator's state at every reset: a later env can start an evaluation where one started."""

        def reset(self):
            self.reset_states = [*getattr(self, "reset_states", []), self.gen.get_state()]
            return super().reset()

    return torch, Recording(**kwargs)


def replaying(gen_state, **kwargs):
    """A stand-in whose every reset starts from the generator state gen_state (the same starts, and with the same
    actions the same episodes, as the reset that gen_state was recorded at)."""
    from isaaclab_standin import StandInMARLEnv

    class Replay(StandInMARLEnv):
        def reset(self):
            self.gen.set_state(gen_state)
            return super().reset()

    return Replay(**kwargs)


def assert_one_line_exit_2(res, *expected):
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert res.stderr.startswith("error: ") and all(text in res.stderr for text in expected), res.stderr


def test_missing_isaac_sim_is_one_line_exit_2(tmp_path):
    if importlib.util.find_spec("isaaclab"):
        pytest.skip("IsaacLab is installed here")
    res = subprocess.run([sys.executable, SCRIPT, "--num-envs", "8"], cwd=tmp_path, capture_output=True, text=True)
    assert_one_line_exit_2(res, "IsaacLab is not installed here (missing: ", "isaaclab", "needs Isaac Sim")
    assert "docs/ddpl_isaaclab.md" in res.stderr
    assert not (tmp_path / "runs").exists()  # nothing written


def test_tyro_rejects_bad_input_with_exit_code_2(tmp_path):
    res = subprocess.run(
        [sys.executable, SCRIPT, "--weight-rule", "bogus"], cwd=tmp_path, capture_output=True, text=True
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr and "bogus" in res.stderr, res.stderr
    assert not (tmp_path / "runs").exists()


def test_evaluate_tool_says_isaac_sim_is_needed(tmp_path):
    """A model.flax of this script, evaluated where Isaac Sim cannot run: one line, exit 2."""
    if importlib.util.find_spec("isaaclab"):
        pytest.skip("IsaacLab is installed here")
    model = {"actor": {"w": np.zeros((1, 2))}, "global_step": 24, "config": json.dumps(asdict(m.Args()))}
    (tmp_path / "model.flax").write_bytes(flax.serialization.to_bytes(model | {"script": "ddpl_isaaclab.py"}))
    res = subprocess.run([sys.executable, TOOL, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert_one_line_exit_2(res, "IsaacLab is not installed here", "needs Isaac Sim")
    res = subprocess.run(
        [sys.executable, TOOL, str(tmp_path), "--num-eval-episodes", "3"], capture_output=True, text=True
    )
    assert_one_line_exit_2(res, "--num-eval-episodes does not apply")


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


@pytest.mark.slow
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
        m.IsaacAdapter(env, num_seeds=1)
    else:
        with pytest.raises(ValueError, match=r"jax\[cuda12\]"):
            m.IsaacAdapter(env, num_seeds=1)
    m.IsaacAdapter(standin(device="cpu")[1], num_seeds=1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run of main(args, env) on the stand-in: 2 seeds x 3 envs, 2 chunks, --save-model."""
    tmp = tmp_path_factory.mktemp("train")
    _, env = standin(num_envs=6, max_episode_length=4)
    assert m.main(tiny_args(tmp, save_model=True), env) == 0
    (run_dir,) = (tmp / "runs").iterdir()
    return run_dir, env


def read_rows(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_train_writes_a_complete_run_folder(run):
    run_dir, env = run
    for name in ("config.json", "metrics.csv", "summary.json", "learning_curve.png", "model.flax"):
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary) and summary["script"] == "ddpl_isaaclab.py"
    assert summary["env_id"] == "IsaacLab_Isaac-Shadow-Hand-Over-Direct-v0" and summary["total_timesteps"] == 24
    assert summary["num_seeds"] == 2 and len(summary["final_eval_return"]["per_seed"]) == 2
    assert summary["diverged_seeds"] == [] and summary["jax_backend"] == jax.default_backend()
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


@pytest.mark.slow
def test_evaluate_tool_reproduces_the_final_evaluation(run, monkeypatch, capsys):
    """benchmarks/evaluate.py on the saved model, in-process, with the stand-in in place of Isaac Sim: its resets start
    where the training run's last evaluation started, so the tool must give that evaluation bit for bit (as text)."""
    run_dir, env = run
    start = env.reset_states[-2]  # the last evaluation's reset (the last reset of all starts training again)
    played = []

    @contextlib.contextmanager
    def isaac_sim(args):
        played.append(replaying(start, num_envs=args.num_seeds * args.num_envs, max_episode_length=4))
        yield played[-1]

    monkeypatch.setattr(m, "isaac_sim", isaac_sim)
    monkeypatch.setattr(sys, "argv", [TOOL, str(run_dir), "--json"])
    spec = importlib.util.spec_from_file_location("evaluate_tool", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main() == 0 and len(played) == 1
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["script"] == "ddpl_isaaclab.py" and out["global_step"] == 24 and out["seeds"] == [0, 1]
    last = [r for r in read_rows(run_dir) if r["global_step"] == "24"]
    for name in ("episodic_return", "episode_length"):
        assert [repr(v) for v in out[name]] == [r[name] for r in last], name


@pytest.mark.slow
def test_a_diverged_seed_is_left_out_and_the_others_train_on(tmp_path, monkeypatch, capsys):
    """Seed 2 of 4 starts with NaN critics (injected): it is reported once, summary.json holds the other three, and
    the process exits 1."""
    make_train = m.make_train

    def poisoned(args, env):
        train = make_train(args, env)
        init = train.init

        def init_nan(seed):
            rs = init(seed)
            critic = jax.tree.map(lambda x: jnp.where(seed == 2, jnp.nan, x), rs["learner"]["critic"])
            return rs | {"learner": rs["learner"] | {"critic": critic}}

        train.init = init_nan
        return train

    monkeypatch.setattr(m, "make_train", poisoned)
    _, env = standin(num_envs=12, max_episode_length=4)
    assert m.main(tiny_args(tmp_path, num_seeds=4), env) == 1
    lines = re.findall(r"seed \d+ diverged at .*", capsys.readouterr().err)  # the progress bar shares stderr
    assert lines == ["seed 2 diverged at env step 12: critic_loss, actor_loss, q_mean, parameters non-finite"], lines
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["diverged_seeds"] == [{"seed": 2, "labels": "", "global_step": 12}]
    rows = read_rows(run_dir)
    healthy = [float(r["episodic_return"]) for r in rows[-4:] if r["seed"] != "2"]
    assert summary["final_eval_return"]["per_seed"] == healthy and len(healthy) == 3
    assert all(np.isfinite(float(r["critic_loss"])) for r in rows if r["seed"] != "2")


def test_bad_input_exits_2_before_writing(tmp_path, capsys):
    _, env = standin(num_envs=6)
    assert m.main(tiny_args(tmp_path, num_action_samples=1), env) == 2
    assert m.main(tiny_args(tmp_path, num_envs=2), env) == 2  # the env holds 3 per seed
    assert not (tmp_path / "runs").exists()
    assert capsys.readouterr().err.count("error: ") == 2
