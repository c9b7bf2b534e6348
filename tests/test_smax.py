"""ddpl_smax.py: the CLI contract on both paper maps (run folder, evaluation of a saved model, bad input), and the SMAX
glue (auto-reset, truncation, wins, dead allies) that the replay buffer relies on."""

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
import tyro

import ddpl_smax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a tiny budget: 4 envs, 2 chunks of 200 steps, updates from step 100, a 300-row buffer (it wraps around)
TINY = [
    "--total-timesteps", "400", "--eval-every", "200", "--num-envs", "4", "--learning-starts", "100",
    "--batch-size", "16", "--hidden-size", "32", "--num-diffusion-steps", "5", "--num-eval-episodes", "4",
    "--buffer-size", "300",
]  # fmt: skip
SUMMARY_KEYS = {"script", "env_id", "total_timesteps", "num_seeds", "final_eval_return", "best_eval_return"}
SUMMARY_KEYS |= {"final_win_rate", "wall_time_s", "sps", "diverged_seeds"}
COLUMNS = ["global_step", "seed", "episodic_return", "win_rate", "train_return", "train_win_rate", "q_first"]
COLUMNS += ["disc_return", "critic_loss", "actor_loss", "q_mean", "max_weight", "weight_ess", "eta", "alive_fraction"]
COLUMNS += ["sps", "wall_time"]


def run_cli(*flags, cwd):
    cmd = [sys.executable, os.path.join(ROOT, "ddpl_smax.py"), *flags]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)


def start_cli(*flags, cwd):
    cmd = [sys.executable, os.path.join(ROOT, "ddpl_smax.py"), *flags]
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_rows(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Side by side (one core each): 3s_vs_5z with 2 seeds saving its model, and 6h_vs_8z with 1 seed."""
    tmp = tmp_path_factory.mktemp("train")
    procs = {
        "3s_vs_5z": start_cli(*TINY, "--num-seeds", "2", "--seed", "3", "--save-model", "--runs-dir", str(tmp / "a"),
                              cwd=tmp),
        "6h_vs_8z": start_cli(*TINY, "--map", "6h_vs_8z", "--runs-dir", str(tmp / "b"), cwd=tmp),
    }  # fmt: skip
    for proc in procs.values():
        _, stderr = proc.communicate(timeout=900)
        assert proc.returncode == 0, stderr
    return {"3s_vs_5z": next((tmp / "a").iterdir()), "6h_vs_8z": next((tmp / "b").iterdir())}


@pytest.mark.slow
@pytest.mark.parametrize("map_name, num_seeds", [("3s_vs_5z", 2), ("6h_vs_8z", 1)])
def test_run_folder_is_complete(runs, map_name, num_seeds):
    run_dir = runs[map_name]
    for name in ("config.json", "metrics.csv", "summary.json", "learning_curve.png"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "model.flax").is_file() == (map_name == "3s_vs_5z")  # --save-model only there
    summary = json.loads((run_dir / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary) and summary["diverged_seeds"] == []
    assert summary["script"] == "ddpl_smax.py" and summary["env_id"] == f"SMAX_{map_name}"
    assert summary["num_seeds"] == num_seeds and summary["total_timesteps"] == 400
    for key in ("final_eval_return", "best_eval_return", "final_win_rate"):
        assert set(summary[key]) == {"mean", "std", "per_seed"} and len(summary[key]["per_seed"]) == num_seeds
    rows = read_rows(run_dir)
    assert list(rows[0]) == COLUMNS
    assert sorted({int(r["global_step"]) for r in rows}) == [200, 400] and len(rows) == 2 * num_seeds
    final = [r for r in rows if r["global_step"] == "400"]
    assert summary["final_eval_return"]["per_seed"] == [float(r["episodic_return"]) for r in final]
    assert summary["final_win_rate"]["per_seed"] == [float(r["win_rate"]) for r in final]
    for r in rows:
        assert 0.0 <= float(r["episodic_return"]) <= 2.0  # damage (at most 1) + win bonus (1)
        assert float(r["win_rate"]) in (0.0, 0.25, 0.5, 0.75, 1.0)  # 4 eval episodes
        assert np.isfinite(float(r["critic_loss"])) and np.isfinite(float(r["actor_loss"]))
        assert 0.25 <= float(r["max_weight"]) <= 1.0  # normalised over M = 4
        assert 0.0 < float(r["alive_fraction"]) <= 1.0
        assert 0.0 <= float(r["disc_return"]) <= float(r["episodic_return"]) + 1e-6  # rewards are never negative
    # 200 steps of 4 envs contain finished episodes (random play lasts 23-101 steps)
    assert any(r["train_return"] != "nan" and 0.0 <= float(r["train_return"]) <= 2.0 for r in rows)


@pytest.mark.slow
def test_evaluate_tool_reproduces_the_final_evaluation(runs):
    """benchmarks/evaluate.py on the saved model: the training run's last return, win rate and discounted return, bit
    for bit (compared as text)."""
    trained = runs["3s_vs_5z"]
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "evaluate.py"), str(trained), "--json"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["script"] == "ddpl_smax.py" and out["global_step"] == 400 and out["seeds"] == [3, 4]
    assert set(out) == {"script", "global_step", "seeds", "episodic_return", "win_rate", "disc_return"}
    last = [r for r in read_rows(trained) if r["global_step"] == "400"]
    for name in ("episodic_return", "win_rate", "disc_return"):
        assert [repr(v) for v in out[name]] == [r[name] for r in last], name


def test_unknown_map_exits_2_listing_the_maps_and_writes_nothing(tmp_path):
    res = run_cli("--map", "3s_vs_6z", "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    text = " ".join(ln.strip("│ ") for ln in res.stderr.splitlines())
    assert "invalid choice '3s_vs_6z' for argument '--map'" in text and "'3s_vs_5z'" in text, res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "runs").exists()  # nothing written


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--noise-schedule", "quadratic"], "Expected one of ('linear', 'cosine', 'vp')"),
        (["--eval-only"], "Unrecognized options: --eval-only"),  # benchmarks/evaluate.py evaluates saved models
        (["--checkpoint", "model.flax"], "Unrecognized options: --checkpoint"),
        (["--probe-every", "200"], "Unrecognized options: --probe-every"),  # probes: ddpl_gaussian_ablation.py
        (["--mapp", "3s_vs_5z"], "--mapp"),
    ],
)
def test_tyro_rejects_bad_input_with_exit_code_2(capsys, flags, expected):
    """In process, as the CLI runs it: tyro.cli(Args) exits 2 before main() runs, so nothing is written."""
    with pytest.raises(SystemExit) as exit_info:
        tyro.cli(ddpl_smax.Args, args=flags)
    assert exit_info.value.code == 2
    assert expected in " ".join(ln.strip("│ ") for ln in capsys.readouterr().err.splitlines())


@pytest.mark.parametrize(
    "flags, expected",
    [
        ({"num_action_samples": 1}, "--num-action-samples must be >= 2"),
        ({"eval_every": 10, "num_envs": 20}, "need --num-envs <= --eval-every <= --total-timesteps"),
        ({"buffer_size": 10}, "--buffer-size must be >= 20"),
        ({"target_ess": 1.0}, "need 0 <= --target-ess < 1 and 0 <= --proposal-mix < 1, got 1.0, 0.0"),
        ({"proposal_mix": 1.0}, "need 0 <= --target-ess < 1 and 0 <= --proposal-mix < 1, got 0.0, 1.0"),
        ({"learning_rate_end": 0.0}, "--learning-rate and --learning-rate-end > 0"),
    ],
)
def test_invalid_flags_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, flags, expected):
    assert ddpl_smax.main(ddpl_smax.Args(runs_dir=str(tmp_path / "runs"), **flags)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not (tmp_path / "runs").exists()


def test_valid_maps_include_the_paper_maps():
    maps = ddpl_smax.valid_maps()
    assert {"3s_vs_5z", "6h_vs_8z"} <= set(maps) and maps == sorted(maps)
    assert typing.get_args(typing.get_type_hints(ddpl_smax.Args)["map"]) == tuple(maps)  # --map's choices


# ---------------------------------------------------------------------------------------------------------------------
# Env glue
# ---------------------------------------------------------------------------------------------------------------------
E, MAX_STEPS = 6, 3  # a 3-step time limit: episodes are truncated at env step 4 (nobody dies that fast)


@pytest.fixture(scope="module")
def short():
    env = ddpl_smax.SMAXArrays("3s_vs_5z", max_steps=MAX_STEPS)
    reset = jax.jit(jax.vmap(env.reset))
    step = jax.jit(jax.vmap(env.step))
    return env, reset, step


def test_dims_of_the_paper_maps():
    for map_name, dims in (("3s_vs_5z", (3, 101, 80, 4, 101)), ("6h_vs_8z", (6, 179, 140, 4, 101))):
        env = ddpl_smax.SMAXArrays(map_name)
        assert (env.num_agents, env.obs_dim, env.state_dim, env.act_dim, env.episode_length) == dims


def test_actions_map_into_the_open_unit_box(short):
    env = short[0]
    a = env.to_env_action(jnp.array([-1.0, 0.0, 1.0, 3.0, -7.0]))
    np.testing.assert_allclose(np.asarray(a), [1e-3, 0.5, 1 - 1e-3, 1 - 1e-3, 1e-3], rtol=1e-6)


def scaled_world_state(env, world_state):
    """The critics' input built from jaxmarl's raw world_state (units x [health, x, y, cooldown, type one-hot], then
    team and type ids): positions / map size, cooldown / the type's maximum clipped to [0, 1], ids dropped."""
    U, F = env.env.num_allies + env.env.num_enemies, len(env.env.own_features)
    units = np.array(world_state[..., : U * F]).reshape(*world_state.shape[:-1], U, F)
    types = np.asarray(world_state[..., -U:], dtype=int)
    units[..., 1:3] /= np.array([env.env.map_width, env.env.map_height])
    units[..., 3] = np.clip(units[..., 3] / np.asarray(env.env.unit_type_weapon_cooldowns)[types], 0.0, 1.0)
    return units.reshape(*world_state.shape[:-1], U * F)


@pytest.mark.slow  # compiles the vmapped SMAX step and jaxmarl's (more than 10 s)
def test_step_matches_jaxmarl_and_keeps_the_true_last_observation(short):
    """obs/state/reward/done equal env.step with the same keys, across an auto-reset; next_obs is step_env's output,
    not the reset observation; the time limit is truncation (done, not terminal)."""
    env, reset, step = short
    native = jax.jit(jax.vmap(env.env.step))
    obs, world_state, state = reset(jax.random.split(jax.random.PRNGKey(1), E))
    key = jax.random.PRNGKey(2)
    for t in range(1, MAX_STEPS + 2):
        key, k_act, k_env = jax.random.split(key, 3)
        action = jax.random.uniform(k_act, (E, env.num_agents, 4), minval=-1.0, maxval=1.0)
        keys = jax.random.split(k_env, E)
        out = step(keys, state, action)
        env_action = env.to_env_action(action)
        obs_n, state_n, reward_n, done_n, _ = native(
            keys, state, {a: env_action[:, i] for i, a in enumerate(env.agents)}
        )
        # equal up to float32 rounding: the two programs fuse the position arithmetic differently
        close = dict(rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out["obs"], jnp.stack([obs_n[a] for a in env.agents], axis=1), **close)
        np.testing.assert_allclose(out["world_state"], scaled_world_state(env, obs_n["world_state"]), **close)
        assert (out["world_state"] >= 0).all() and (out["world_state"] <= 1).all()  # critic inputs stay bounded
        for x, y in zip(jax.tree.leaves(out["state"]), jax.tree.leaves(state_n), strict=True):
            np.testing.assert_allclose(x, y, **close)
        np.testing.assert_allclose(out["reward"], reward_n[env.agents[0]], **close)
        np.testing.assert_array_equal(out["done"], done_n["__all__"])
        assert not out["terminal"].any() and not out["won"].any() and out["next_alive"].all()
        if t <= MAX_STEPS:
            assert not out["done"].any()
            np.testing.assert_array_equal(out["next_obs"], out["obs"])
        else:  # the time limit fires on env step max_steps + 1
            assert out["done"].all()
            assert (out["next_obs"] != out["obs"]).any(axis=(1, 2)).all()
            assert (out["next_world_state"] != out["world_state"]).any(axis=1).all()
        state = out["state"]


@pytest.mark.slow
def test_critic_inputs_stay_bounded_over_random_episodes():
    """Whole random episodes on 3s_vs_5z: jaxmarl's raw world_state leaves any fixed range (positions up to 32,
    cooldowns below 0), the critics' input stays in [0, 1] and is the scaled raw state throughout."""
    env = ddpl_smax.SMAXArrays("3s_vs_5z")
    obs, critic_state, state = jax.vmap(env.reset)(jax.random.split(jax.random.PRNGKey(0), 8))

    def step(state, key):
        k_act, k_env = jax.random.split(key)
        action = jax.random.uniform(k_act, (8, env.num_agents, 4), minval=-1.0, maxval=1.0)
        out = jax.vmap(env.step)(jax.random.split(k_env, 8), state, action)
        return out["state"], (out["next_world_state"], jax.vmap(env.env.get_world_state)(out["state"]))

    _, (critic, raw) = jax.jit(lambda s: jax.lax.scan(step, s, jax.random.split(jax.random.PRNGKey(1), 150)))(state)
    critic, raw = np.asarray(critic), np.asarray(raw)
    assert raw.max() > 10 and raw.min() < -1  # the raw state: map units and drifting cooldowns
    assert critic.min() >= 0.0 and critic.max() <= 1.0
    assert critic[..., 1:80:10].max() > 0.3  # positions are there, scaled (not all zero)


@pytest.mark.slow  # compiles the vmapped SMAX step: about 25 s of CPU
def test_win_draw_loss_and_dead_allies(short):
    """Constructed endings: enemies at 0 health -> win (reward 1, terminal), both teams -> draw, allies -> loss;
    one ally down -> the episode goes on, the ally observes zeros and is marked dead at s' and then at s."""
    env, reset, step = short
    _, _, state = reset(jax.random.split(jax.random.PRNGKey(5), E))
    n = env.num_agents
    health = state.state.unit_health
    health = health.at[0:2, n:].set(0.0).at[2, :].set(0.0).at[3, :n].set(0.0).at[4, 0].set(0.0)
    state = state.replace(state=state.state.replace(unit_health=health))
    action = jnp.zeros((E, n, 4))
    out = step(jax.random.split(jax.random.PRNGKey(6), E), state, action)
    np.testing.assert_array_equal(out["won"], [1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(out["terminal"], [1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(out["won"], out["done"] & (out["reward"] >= 1.0))
    np.testing.assert_allclose(out["reward"][:2], 1.0, atol=1e-6)
    assert out["alive"].all()
    np.testing.assert_array_equal(out["next_alive"][3], [0, 0, 0])
    np.testing.assert_array_equal(out["next_alive"][4], [0, 1, 1])
    assert (out["next_obs"][4, 0] == 0).all() and (out["next_obs"][4, 1:] != 0).any(axis=-1).all()
    out2 = step(jax.random.split(jax.random.PRNGKey(7), E), out["state"], action)
    np.testing.assert_array_equal(out2["alive"][4], [0, 1, 1])


def test_issm_weights_leave_dead_rows_out():
    q = jax.random.normal(jax.random.PRNGKey(0), (4, 5))
    alive = jnp.array([1.0, 0.0, 1.0, 0.0])
    plain = ddpl_smax.issm_weights(q, 1.0)
    w = ddpl_smax.alive_issm_weights(plain, alive)
    np.testing.assert_allclose(w[1::2], 0.0)
    np.testing.assert_allclose(w[0::2], 2.0 * plain[0::2], rtol=1e-6)  # B / rows alive = 4 / 2
    # the weighted DSM loss is then the mean over the living rows only
    np.testing.assert_allclose(w.sum(), 4.0, rtol=1e-6)
    np.testing.assert_allclose(ddpl_smax.alive_issm_weights(plain, jnp.zeros(4)), 0.0)
