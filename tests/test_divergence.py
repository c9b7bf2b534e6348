"""The divergence guard of every learning script: a non-finite loss, Q or parameter ends the run after its chunk with
one `diverged` line on stderr and exit code 1, keeping config.json and metrics.csv and writing no summary.json."""

import importlib
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO_ROOT

SCRIPTS = ("ddpl_mpe", "ddpl_smax", "ddpl_mamujoco", "ddpl_isaaclab", "ddpl_gaussian_ablation")


@pytest.mark.parametrize("name", SCRIPTS)
def test_divergence_names_what_went_non_finite(name):
    divergence = importlib.import_module(name).divergence
    learner = {"actor": {"w": jnp.ones(3)}, "critic": {"w": jnp.ones(3)}}
    warm_up = {"critic_loss": np.full(2, np.nan), "actor_loss": np.full(2, np.nan), "q_mean": np.full(2, np.nan)}
    assert divergence(warm_up, learner) is None  # NaN metrics of a chunk without updates are not a divergence
    assert divergence({"critic_loss": np.ones(2), "q_mean": np.array([1.0, np.inf])}, learner) == "q_mean non-finite"
    learner["critic"]["w"] = jnp.array([1.0, np.nan, 0.0])
    reason = divergence({"critic_loss": np.array([np.nan, 1.0]), "q_mean": np.ones(2)}, learner)
    assert reason == "critic_loss, critic parameters non-finite"


def test_absurd_learning_rate_stops_the_run_with_exit_code_1(tmp_path):
    flags = ["--total-timesteps", "800", "--eval-every", "400", "--num-envs", "4", "--learning-starts", "200"]
    flags += ["--batch-size", "16", "--hidden-size", "16", "--num-diffusion-steps", "3", "--num-eval-episodes", "2"]
    flags += ["--learning-rate", "1e30", "--learning-rate-end", "1e30", "--runs-dir", str(tmp_path)]
    cmd = [sys.executable, os.path.join(REPO_ROOT, "ddpl_mpe.py"), *flags]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 1, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if "diverged" in line]
    assert len(lines) == 1 and "env step 400" in lines[0] and "critic parameters" in lines[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    (run_dir,) = tmp_path.iterdir()
    assert sorted(os.listdir(run_dir)) == ["config.json", "metrics.csv"]
    assert len((run_dir / "metrics.csv").read_text().splitlines()) == 2  # header and the diverged chunk's row
