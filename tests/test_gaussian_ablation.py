"""ddpl_gaussian_ablation.py: both projections and --compare on tiny budgets, bad input, and the Gaussian
reverse-KL step's mode seeking (the paper's failure mode in miniature) against the forward fit's mass covering."""

import csv
import importlib
import inspect
import json
import os
import subprocess
import sys
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ddpl_gaussian_ablation as abl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--total-timesteps", "400", "--eval-every", "200", "--num-envs", "4", "--learning-starts", "100",
    "--batch-size", "16", "--hidden-size", "32", "--num-diffusion-steps", "5", "--num-eval-episodes", "4",
    "--buffer-size", "300", "--num-seeds", "2",
]  # fmt: skip


def start_cli(*flags, cwd):
    cmd = [sys.executable, os.path.join(ROOT, "ddpl_gaussian_ablation.py"), *flags]
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_rows(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Side by side: MPE --compare (reverse KL) with probes, SMAX 3s_vs_5z with the forward projection, and the toy
    game's --compare for N = 1 and 2 (its own small defaults, with the budget cut further)."""
    tmp = tmp_path_factory.mktemp("ablation")
    toy = ["--env", "toy", "--compare", "--toy-agents", "1", "2", "--total-timesteps", "160", "--eval-every", "80"]
    toy += ["--learning-starts", "40", "--num-seeds", "2", "--hidden-size", "16", "--num-diffusion-steps", "3"]
    procs = {
        "compare": start_cli(*TINY, "--compare", "--probe-every", "200", "--runs-dir", str(tmp / "a"), cwd=tmp),
        "forward": start_cli(*TINY, "--env", "smax", "--projection", "forward", "--runs-dir", str(tmp / "b"), cwd=tmp),
        "toy": start_cli(*toy, "--runs-dir", str(tmp / "c"), cwd=tmp),
    }
    for proc in procs.values():
        _, stderr = proc.communicate(timeout=900)
        assert proc.returncode == 0, stderr
    return {name: next((tmp / d).iterdir()) for name, d in (("compare", "a"), ("forward", "b"), ("toy", "c"))}


def test_compare_trains_both_classes_on_the_same_seeds(runs):
    run_dir = runs["compare"]
    for name in ("config.json", "metrics.csv", "summary.json", "learning_curve.png", "probe.png", "probes.npz"):
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["policy"] == "gaussian-reverse" and summary["env_id"] == "MPE_simple_reference_v3"
    assert set(summary["comparison"]) == {"diffusion", "gaussian-reverse"}
    assert summary["final_eval_return"] == summary["comparison"]["gaussian-reverse"]["final_eval_return"]
    rows = read_rows(run_dir)
    assert "win_rate" not in rows[0]  # MPE has no wins
    for label in ("diffusion", "gaussian-reverse"):
        mine = [r for r in rows if r["policy"] == label]
        assert [(r["global_step"], r["seed"]) for r in mine] == [("200", "0"), ("200", "1"), ("400", "0"), ("400", "1")]
        final = [float(r["episodic_return"]) for r in mine if r["global_step"] == "400"]
        assert summary["comparison"][label]["final_eval_return"]["per_seed"] == final
        for r in mine:
            assert np.isfinite(float(r["critic_loss"])) and 0.0 < float(r["action_std"]) <= 1.0
            # the critic check: MPE rewards are negative, so discounting shrinks the return toward 0
            assert np.isfinite(float(r["q_first"])) and float(r["episodic_return"]) <= float(r["disc_return"]) < 0
    probes = np.load(run_dir / "probes.npz")
    for label in ("diffusion", "gaussian-reverse"):
        assert list(probes[f"{label}__steps"]) == [0, 200, 400]
        actions = probes[f"{label}__actions"]  # (probe, seed, agent, sample, action dim)
        assert actions.shape == (3, 2, 2, abl.PROBE_SAMPLES, 15) and np.abs(actions).max() <= 1.0
    # the policies moved between probes, and the two classes share nothing but the probe state
    assert not np.array_equal(probes["diffusion__actions"][0], probes["diffusion__actions"][-1])


def test_forward_projection_on_smax(runs):
    run_dir = runs["forward"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["policy"] == "gaussian-forward" and summary["env_id"] == "SMAX_3s_vs_5z"
    assert "comparison" not in summary and set(summary["final_win_rate"]) == {"mean", "std", "per_seed"}
    rows = read_rows(run_dir)
    assert {r["policy"] for r in rows} == {"gaussian-forward"} and len(rows) == 4
    for r in rows:
        assert 0.0 <= float(r["episodic_return"]) <= 2.0 and 0.0 <= float(r["win_rate"]) <= 1.0
        assert 0.25 <= float(r["max_weight"]) <= 1.0


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--env", "mujoco"], "'mujoco' for argument '--env'. Expected one of ('mpe', 'smax', 'toy')"),
        (["--env", "toy", "--toy-agents", "0"], "--toy-agents must be numbers of agents >= 1"),
        (["--projection", "sideways"], "Expected one of ('reverse', 'forward')"),
        (["--policy", "beta"], "Expected one of ('gaussian', 'diffusion')"),
        (["--env", "smax", "--map", "1z_vs_1z"], "valid maps: 10m_vs_11m"),
        (["--env-id", "MPE_nonsense"], "valid ids: MPE_simple_v3"),
        (["--probe-every", "30000"], "--probe-every must be 0 or a multiple of the chunk (20000"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, flags, expected):
    cmd = [sys.executable, os.path.join(ROOT, "ddpl_gaussian_ablation.py"), *flags, "--runs-dir", str(tmp_path / "r")]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and expected in lines[0], res.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "script, name",
    [
        ("ddpl_mpe", "is_continuous_mpe"),
        ("ddpl_mpe", "valid_env_ids"),
        ("ddpl_mpe", "MPEArrays"),
        ("ddpl_smax", "SMAXArrays"),
        ("ddpl_smax", "alive_issm_weights"),
    ],
)
def test_env_glue_is_the_ddpl_scripts_text(script, name):
    """The MPE and SMAX glue are the DDPL scripts' own text (MPEGlue adapts MPE's), so the copies cannot drift."""
    source = inspect.getsource(getattr(importlib.import_module(script), name))
    assert inspect.getsource(getattr(abl, name)) == source, f"{name} differs from {script}.py's"


MODES, MODE_WIDTH = (-0.5, 0.5), 0.15


def bimodal_q(a):
    """Q(a) = log of an equal mixture of N(-0.5, 0.15^2) and N(0.5, 0.15^2), up to a constant: two equal modes."""
    return jax.nn.logsumexp(jnp.stack([-0.5 * ((a - m) / MODE_WIDTH) ** 2 for m in MODES]), axis=0)


def test_reverse_kl_gaussian_collapses_onto_one_mode_of_a_bimodal_target():
    """Thm 3.1 in miniature, with the script's own (tanh-squashed) Gaussian class and reverse-KL loss: repeated
    DecSPG steps toward pi^t exp(Q) with a fixed bimodal Q, from tanh of N(0.1, 0.5^2). The exact energy-based iterate
    pi^0 exp(t Q) keeps both modes (their mass ratio is fixed by pi^0); the Gaussian commits to one mode and loses
    the other."""
    steps = 400
    args = replace(abl.Args(), projection="reverse", num_action_samples=64, eta=1.0, weight_rule="raw")
    init, _, actor_loss = abl.make_policy(args, "gaussian", 1)
    params = jax.tree.map(jnp.zeros_like, init(jax.random.PRNGKey(0), 1))  # the heads' biases alone set mu, sigma
    params["params"]["Dense_3"]["bias"] = jnp.array([0.1])
    params["params"]["Dense_4"]["bias"] = jnp.array([jnp.log(0.5)])
    obs, alive = jnp.zeros((32, 1)), jnp.ones(32)
    tx = optax.adam(1e-2)
    opt = tx.init(params)
    temp = {"log_eta": jnp.zeros(()), "q_scale": jnp.zeros(())}  # fixed eta (no --target-ess)

    @jax.jit
    def step(params, opt, key):  # pi^t = the parameters before this step
        q_fn = lambda a: bimodal_q(a[..., 0])  # noqa: E731
        grads = jax.grad(lambda p: actor_loss(p, params, obs, alive, q_fn, temp, key)[0])(params)
        updates, opt = tx.update(grads, opt)
        return optax.apply_updates(params, updates), opt

    for key in jax.random.split(jax.random.PRNGKey(1), steps):
        params, opt = step(params, opt, key)
    mean, log_std = abl.GaussianActor(action_dim=1, hidden=args.hidden_size).apply(params, obs[:1])
    actions = np.asarray(
        jnp.tanh(mean[0, 0] + jnp.exp(log_std[0, 0]) * jax.random.normal(jax.random.PRNGKey(2), (4096,)))
    )
    mean, std = float(actions.mean()), float(actions.std())  # of the squashed actions
    kept, lost = (0.5, -0.5) if mean > 0 else (-0.5, 0.5)
    assert abs(mean - kept) < 0.1 and std < 0.15, (mean, std)  # on one mode, narrow
    assert np.mean(np.abs(actions - lost) < 0.2) < 0.01  # the other mode's mass is gone
    # the exact iterate after as many steps (eta = 1 per step), on a grid: both modes keep real mass
    grid = jnp.linspace(-1.0, 1.0, 2001)
    log_p = jax.scipy.stats.norm.logpdf(grid, 0.1, 0.5) + steps * bimodal_q(grid)
    p = jnp.exp(log_p - log_p.max())
    p = p / p.sum()
    for m in MODES:
        assert float(p[jnp.abs(grid - m) < 0.2].sum()) > 0.3, m


def test_toy_compare_reports_success_per_class_and_number_of_agents(runs):
    run_dir = runs["toy"]
    for name in ("config.json", "metrics.csv", "summary.json", "learning_curve.png", "success_vs_agents.png"):
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["env_id"] == "toy" and summary["toy_agents"] == [1, 2] and summary["num_seeds"] == 2
    rows = read_rows(run_dir)
    for label in ("diffusion", "gaussian-reverse"):
        for n in ("1", "2"):
            final = [r for r in rows if (r["policy"], r["num_agents"], r["global_step"]) == (label, n, "160")]
            rate = summary["success_rate"][label][n]
            assert rate["per_seed"] == [float(r["win_rate"]) for r in final] and len(final) == 2
            assert all(0.0 <= v <= 1.0 for v in rate["per_seed"])
            # team reward = sum over the copies, each at most 1 per step: a 10-step return is at most 10 N
            assert all(0.0 <= float(r["episodic_return"]) <= 10.0 * int(n) for r in final)
            assert all(0.0 <= float(r["disc_return"]) <= float(r["episodic_return"]) + 1e-6 for r in final)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["gamma"] == abl.TOY_DEFAULTS.gamma and config["total_timesteps"] == 160  # toy default, flag


def test_env_toy_takes_the_toy_defaults_and_flags_still_win(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["ddpl_gaussian_ablation.py", "--env", "toy", "--total-timesteps", "300"])
    args = abl.parse_cli()
    assert args.total_timesteps == 300 and args.hidden_size == abl.TOY_DEFAULTS.hidden_size != abl.Args().hidden_size
    monkeypatch.setattr(sys, "argv", ["ddpl_gaussian_ablation.py", "--env=mpe"])
    assert abl.parse_cli() == abl.Args()


def test_toy_game_is_toy_failure_mode_s_game():
    """The parameters are toy_failure_mode.py's defaults, and the dynamics are the MDP of Sec. 3.2.1 per agent: the
    bump pays at a = 0, only the window around a* moves to goal (with probability p), goal pays at a_g; success is
    every copy at goal when the episode ends, so an optimal team succeeds with probability p^N."""
    import toy_failure_mode

    toy_args = toy_failure_mode.Args()
    assert all(getattr(toy_args, k) == v for k, v in abl.TOY.items()) and abl.TOY_DEFAULTS.gamma == toy_args.gamma
    env, n = abl.ToyArrays(2), 4000
    obs, world_state, state = env.reset(jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.asarray(obs), [[1, 0, 0], [1, 0, 0]])
    keys = jax.random.split(jax.random.PRNGKey(1), n)
    out = jax.vmap(env.step, (0, None, None))(keys, state, jnp.array([[0.0], [0.8]]))  # bump, then a*
    np.testing.assert_allclose(np.asarray(out["reward"]), 1.0, atol=1e-6)  # 1 + exp(-32): the bump alone pays
    assert (np.asarray(out["next_obs"][:, 0]) == [0, 0, 1]).all()  # a = 0 always falls to sink
    at_goal = np.asarray(out["next_obs"][:, 1, 1])
    assert set(np.unique(at_goal)) == {0.0, 1.0} and abs(at_goal.mean() - 0.5) < 0.03  # a* reaches goal w.p. p

    def episode(key):  # both agents play a* in s0, then a_g: return and success
        state, ret = env.reset(key)[2], 0.0
        for t in range(env.episode_length):
            key, k = jax.random.split(key)
            out = env.step(k, state, jnp.full((2, 1), 0.8 if t == 0 else -0.5))
            state, ret = out["state"], ret + out["reward"][0]
        return ret, out["won"], out["done"]

    ret, won, done = jax.jit(jax.vmap(episode))(keys)
    assert np.asarray(done).all() and abs(float(won.mean()) - 0.25) < 0.03  # p^2
    np.testing.assert_allclose(np.asarray(ret)[np.asarray(won)], 18.0, atol=1e-4)  # 9 goal steps x 2 agents
