"""Divergence per seed (the harness's RunFolder.log and every script's main): a seed whose losses, Q or parameters go
non-finite is reported once on stderr, left out of the summary's statistics and listed in diverged_seeds; the other
seeds train on; exit code 1. With every seed diverged: exit 1, metrics.csv kept, no summary.json."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO_ROOT

import ddpl_mpe

TINY = dict(total_timesteps=800, eval_every=400, num_envs=4, learning_starts=200, batch_size=16, hidden_size=16)
TINY |= dict(num_diffusion_steps=3, num_eval_episodes=2, buffer_size=800)


def test_run_folder_reports_a_diverged_seed_once_and_keeps_the_others(tmp_path, capsys):
    run = ddpl_mpe.RunFolder(ddpl_mpe.Args(runs_dir=str(tmp_path)), "env", ("episodic_return", "critic_loss"))
    learner = {"actor": {"w": jnp.ones((3, 2))}, "critic": {"w": jnp.ones((3, 4))}}
    warm_up = {"episodic_return": np.ones(3), "critic_loss": np.full(3, np.nan), "q_mean": np.full(3, np.nan)}
    assert run.log(400, [7, 8, 9], warm_up, learner, 1.0).all()  # NaN losses without updates: not a divergence
    learner["critic"]["w"] = learner["critic"]["w"].at[1, 2].set(np.nan)  # seed 8's critic
    metrics = {"episodic_return": np.ones(3), "critic_loss": np.array([1.0, np.nan, 1.0]), "q_mean": np.ones(3)}
    np.testing.assert_array_equal(run.log(800, [7, 8, 9], metrics, learner, 1.0), [True, False, True])
    metrics["q_mean"] = np.array([np.inf, 1.0, 1.0])  # seed 7: an infinite Q mean counts at once
    np.testing.assert_array_equal(run.log(1200, [7, 8, 9], metrics, learner, 1.0), [False, False, True])
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "seed 8 diverged at env step 800: critic_loss, parameters non-finite",
        "seed 7 diverged at env step 1200: q_mean non-finite",
    ]
    assert (
        run.finish({"final_eval_return": ddpl_mpe.stats([1.0])}, {"return": {"eval": ("episodic_return", {})}}, "t")
        == 1
    )
    summary = json.loads((Path(run.dir) / "summary.json").read_text())
    assert [(d["seed"], d["global_step"]) for d in summary["diverged_seeds"]] == [(8, 800), (7, 1200)]
    assert len((Path(run.dir) / "metrics.csv").read_text().splitlines()) == 1 + 9  # every seed's rows kept


@pytest.mark.slow
def test_one_seed_of_four_diverges_and_three_finish(tmp_path, monkeypatch, capsys):
    """Seed 5's critic is poisoned after its first chunk (an injected fault): seeds 3, 4 and 6 train on, the summary
    holds their statistics, diverged_seeds names seed 5, and main returns 1."""
    make_train = ddpl_mpe.make_train

    def poisoned(args, env):
        train = make_train(args, env)
        init, chunk = train.init, train.chunk

        def init_with_seed(seed):
            return init(seed) | {"lane_seed": seed}

        def chunk_with_fault(rs, c):
            rs, metrics = chunk(rs, c)
            bad = (rs["lane_seed"] == 5) & (c == 0)
            critic = jax.tree.map(lambda x: jnp.where(bad, jnp.nan, x), rs["learner"]["critic"])
            return rs | {"learner": rs["learner"] | {"critic": critic}}, metrics

        train.init, train.chunk = init_with_seed, chunk_with_fault
        return train

    monkeypatch.setattr(ddpl_mpe, "make_train", poisoned)
    args = ddpl_mpe.Args(runs_dir=str(tmp_path), seed=3, num_seeds=4, **TINY)
    assert ddpl_mpe.main(args) == 1
    err = capsys.readouterr().err
    assert [ln for ln in err.splitlines() if "diverged" in ln] == [
        "seed 5 diverged at env step 400: parameters non-finite"
    ], err
    (run_dir,) = tmp_path.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [d["seed"] for d in summary["diverged_seeds"]] == [5]
    rows = [ln.split(",") for ln in (run_dir / "metrics.csv").read_text().splitlines()[1:]]
    final = {int(r[1]): float(r[2]) for r in rows if r[0] == "800"}  # episodic_return at the last chunk, per seed
    assert summary["final_eval_return"]["per_seed"] == [final[3], final[4], final[6]]
    assert np.isfinite(summary["final_eval_return"]["mean"]) and np.isfinite(summary["best_eval_return"]["mean"])


@pytest.mark.slow
def test_every_seed_diverged_exits_1_without_summary(tmp_path):
    flags = ["--total-timesteps", "800", "--eval-every", "400", "--num-envs", "4", "--learning-starts", "200"]
    flags += ["--batch-size", "16", "--hidden-size", "16", "--num-diffusion-steps", "3", "--num-eval-episodes", "2"]
    flags += ["--learning-rate", "1e30", "--learning-rate-end", "1e30", "--runs-dir", str(tmp_path)]
    cmd = [sys.executable, os.path.join(REPO_ROOT, "ddpl_mpe.py"), *flags]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 1, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if "diverged" in line]
    assert len(lines) == 1 and lines[0].startswith("seed 0 diverged at env step 400: "), out.stderr[-2000:]
    assert "parameters non-finite" in lines[0] and "Traceback" not in out.stderr
    (run_dir,) = tmp_path.iterdir()
    assert sorted(os.listdir(run_dir)) == ["config.json", "learning_curve.png", "metrics.csv"]
    assert len((run_dir / "metrics.csv").read_text().splitlines()) == 2  # header and the diverged chunk's row
