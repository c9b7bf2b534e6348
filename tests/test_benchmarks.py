"""benchmarks/timing.py and aggregate.py as a user (or a tool reading their output) runs them: tiny settings, CPU."""

import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT

TIMING = str(REPO_ROOT / "benchmarks" / "timing.py")


@pytest.mark.slow
def test_gpu_reproduce_smoke_writes_timing_and_mpe_results(tmp_path):
    """benchmarks/gpu_reproduce.sh --smoke: the prepared GPU check on the CPU with tiny budgets. It also covers
    timing.py as tools read it: one row per method, and the ratios line last."""
    env = {**os.environ, "PYTHON": sys.executable}
    cmd = ["bash", str(REPO_ROOT / "benchmarks" / "gpu_reproduce.sh"), "--smoke", str(tmp_path / "out")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-2000:])
    res = tmp_path / "out"
    assert [line.split()[:2] for line in (res / "done.txt").read_text().splitlines()] == [
        ["env", "exit=0"], ["timing", "exit=0"], ["mpe", "exit=0"]
    ]  # fmt: skip
    assert "backend cpu" in (res / "env.txt").read_text()
    lines = (res / "timing.txt").read_text().strip().splitlines()
    for method in ("ddpl", "ddpl-full-batch", "dacer", "gaussian"):
        row = [line.split() for line in lines if line.split()[:1] == [method]]
        assert row and float(row[0][1]) > 0 and float(row[0][3]) > 0, (method, lines)
    assert "B=8, K=3, M=4, B_p=2" in "\n".join(lines)  # B_p resolves to B // M as in the scripts
    match = re.fullmatch(r"ratios: DDPL/DACER=(\d+\.\d\d) DDPL/Gaussian=(\d+\.\d\d)", lines[-1])
    assert match, lines[-1]
    assert all(float(x) > 0 for x in match.groups())
    with open(res / "mpe_metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["global_step"]) for r in rows] == [200, 400]
    assert json.loads((res / "mpe_summary.json").read_text())["total_timesteps"] == 400
    assert sorted(p.name for p in res.iterdir()) == sorted(
        ["done.txt", "env.txt", "timing.txt", "mpe.log", "mpe_metrics.csv", "mpe_config.json", "mpe_summary.json"]
    )  # at most 8 files, no subfolder: what the device tool brings back


def test_gpu_reproduce_rejects_unknown_options_with_exit_code_2(tmp_path):
    cmd = ["bash", str(REPO_ROOT / "benchmarks" / "gpu_reproduce.sh"), "--fast"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.startswith("error: unknown option --fast")


def test_timing_rejects_unknown_methods_with_exit_code_2():
    cmd = [sys.executable, TIMING, "--methods", "ddpl,dacer,gaussian,sac"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error:") and "qvpo" in out.stderr and "Traceback" not in out.stderr


AGGREGATE = str(REPO_ROOT / "benchmarks" / "aggregate.py")


def fake_run(path, seeds, returns, **config):
    """A complete run folder of ddpl_mpe.py with evaluations at steps 10 and 20 (returns: {seed: (r10, r20)})."""
    path.mkdir(parents=True)
    config = {"env_id": "MPE_x", "seed": seeds[0], "learning_rate": 1e-4, **config}
    (path / "config.json").write_text(json.dumps(config))
    (path / "summary.json").write_text(json.dumps({"script": "ddpl_mpe.py", "env_id": "MPE_x"}))
    lines = ["global_step,seed,episodic_return,sps"]
    lines += [f"{step},{s},{returns[s][i]},1.0" for i, step in enumerate((10, 20)) for s in seeds]
    (path / "metrics.csv").write_text("\n".join(lines) + "\n")
    return str(path)


def run_aggregate(*run_dirs, out):
    cmd = [sys.executable, AGGREGATE, *run_dirs, "--out-dir", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_aggregate_takes_the_best_mean_over_all_seeds_of_all_runs(tmp_path):
    a = fake_run(tmp_path / "a", [0, 1], {0: (1.0, 2.0), 1: (3.0, 2.0)})
    b = fake_run(tmp_path / "b", [2], {2: (5.0, 1.0)})
    res = run_aggregate(a, b, out=tmp_path / "out")
    assert res.returncode == 0, res.stderr
    with open(tmp_path / "out" / "table.csv", newline="") as f:
        (row,) = csv.DictReader(f)
    # step 10: mean 3.0 > step 20: mean 5/3, so best is step 10 with the std of (1, 3, 5)
    assert (row["seeds"], row["num_runs"], row["best_step"]) == ("0 1 2", "2", "10")
    assert float(row["best_mean"]) == 3.0 and float(row["best_std"]) == pytest.approx(np.std([1.0, 3.0, 5.0]))
    assert float(row["final_mean"]) == pytest.approx(5 / 3)
    assert "3.00 ± 1.63 (3 seeds" in (tmp_path / "out" / "table.md").read_text()


@pytest.mark.parametrize(
    "second, expected",
    [
        (dict(seeds=[2], learning_rate=3e-4), "differ in learning_rate (0.0001 vs 0.0003)"),
        (dict(seeds=[1]), "seed 1 is in both"),
    ],
)
def test_aggregate_refuses_mismatched_runs_with_exit_code_2(tmp_path, second, expected):
    a = fake_run(tmp_path / "a", [0, 1], {0: (1.0, 2.0), 1: (3.0, 2.0)})
    seeds = second.pop("seeds")
    b = fake_run(tmp_path / "b", seeds, {s: (1.0, 1.0) for s in seeds}, **second)
    res = run_aggregate(a, b, out=tmp_path / "out")
    assert res.returncode == 2 and res.stderr.startswith("error:") and expected in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "out").exists()


def test_aggregate_refuses_an_unfinished_run(tmp_path):
    a = fake_run(tmp_path / "a", [0], {0: (1.0, 2.0)})
    os.remove(os.path.join(a, "summary.json"))
    res = run_aggregate(a, out=tmp_path / "out")
    assert res.returncode == 2 and "no summary.json" in res.stderr
