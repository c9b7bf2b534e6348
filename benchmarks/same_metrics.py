"""Refactoring check: the scripts of this checkout write the same metrics.csv as those of an earlier commit.

    python benchmarks/same_metrics.py --ref 8c09ced                  # every script, short runs
    python benchmarks/same_metrics.py --ref 8c09ced --only mpe toy

Checks out REF into a temporary git worktree, runs each script's short configuration below there and here with the
same flags, and compares the outputs: metrics.csv as text without the timing columns (sps, wall_time), and
summary.json without timing fields. Same seeds and flags must give the same numbers bit for bit on one CPU. Prints
one line per run (SAME or DIFFERENT with the first differing row) and exits 1 if any differs. Several minutes on a
2-core CPU; the IsaacLab script needs Isaac Sim and is not covered (its tests drive a stand-in).
"""

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = {"sps", "wall_time", "wall_time_s", "env_share", "train_time_s", "env_time_s", "eval_time_s", "train_sps"}
TINY = ["--num-seeds", "2", "--batch-size", "32", "--hidden-size", "32", "--num-diffusion-steps", "4"]
RUNS = {  # name: (script, flags); each exercises warm-up, updates, two evaluations and the script's modes
    "mpe": ("ddpl_mpe.py", [*TINY, "--total-timesteps", "2000", "--eval-every", "1000", "--num-envs", "4",
                            "--learning-starts", "400", "--num-eval-episodes", "4", "--buffer-size", "4000",
                            "--probe-every", "1000", "--save-model"]),
    "smax": ("ddpl_smax.py", [*TINY, "--total-timesteps", "1000", "--eval-every", "500", "--num-envs", "4",
                              "--learning-starts", "200", "--num-eval-episodes", "2", "--buffer-size", "2000",
                              "--probe-every", "500", "--save-model"]),
    "mamujoco": ("ddpl_mamujoco.py", [*TINY, "--task", "Ant-2x4", "--total-timesteps", "600", "--eval-every",
                                      "300", "--num-envs", "2", "--learning-starts", "200", "--num-eval-episodes",
                                      "2", "--max-episode-steps", "50", "--probe-every", "300", "--save-model"]),
    "ablation-mpe": ("ddpl_gaussian_ablation.py", [*TINY, "--env", "mpe", "--compare", "--total-timesteps", "1000",
                                                   "--eval-every", "500", "--num-envs", "4", "--learning-starts",
                                                   "200", "--num-eval-episodes", "2", "--probe-every", "500"]),
    "ablation-smax": ("ddpl_gaussian_ablation.py", [*TINY, "--env", "smax", "--total-timesteps", "1000",
                                                    "--eval-every", "500", "--num-envs", "4", "--learning-starts",
                                                    "200", "--num-eval-episodes", "2"]),
    "ablation-toy": ("ddpl_gaussian_ablation.py", ["--env", "toy", "--compare", "--toy-agents", "1", "2",
                                                   "--num-seeds", "2", "--total-timesteps", "1000", "--eval-every",
                                                   "500", "--learning-starts", "200", "--num-eval-episodes", "8"]),
    "toy": ("toy_failure_mode.py", ["--num-seeds", "3", "--epochs", "20", "--num-agents-list", "1", "2",
                                    "--figure-epochs", "10", "20", "--pretrain-steps", "100"]),
}  # fmt: skip


def known_flags(tree: str, script: str, flags: list[str]) -> list[str]:
    """flags without the options (and their values) that the script in `tree` does not have: issue 24 moved
    --probe-every to the ablation."""
    help_text = subprocess.run([sys.executable, os.path.join(tree, script), "--help"], capture_output=True, text=True)
    keep, option = [], []
    for flag in [*flags, "--"]:
        if flag.startswith("--"):
            if option and re.search(re.escape(option[0]) + r"[\s,]", help_text.stdout):
                keep += option
            option = [flag]
        else:
            option.append(flag)
    return keep


def run(tree: str, script: str, flags: list[str], runs_dir: str) -> str:
    cmd = [sys.executable, os.path.join(tree, script), *known_flags(tree, script, flags), "--runs-dir", runs_dir]
    out = subprocess.run(cmd, cwd=tree, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{script} in {tree} exited {out.returncode}: {out.stderr.strip()[-800:]}")
    (name,) = os.listdir(runs_dir)
    return os.path.join(runs_dir, name)


def outputs(run_dir: str) -> dict:
    """metrics.csv rows and summary.json, without timing fields."""
    result = {}
    if os.path.exists(path := os.path.join(run_dir, "metrics.csv")):
        with open(path, newline="") as f:
            result["metrics.csv"] = [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(f)]
    with open(os.path.join(run_dir, "summary.json")) as f:
        result["summary.json"] = untimed(json.load(f))
    return result


def untimed(value):
    """A summary without timing fields, at any depth (the ablation's comparison has an sps per class)."""
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if k not in TIMING}
    return value


def first_difference(old: dict, new: dict) -> str | None:
    """The first difference in what both outputs hold: summary keys that one version adds or drops are not compared
    (issue 24 added diverged_seeds and dropped eval_only), metrics.csv rows are compared whole."""
    common = set(old["summary.json"]) & set(new["summary.json"])
    old["summary.json"], new["summary.json"] = (
        {k: d[k] for k in common} for d in (old["summary.json"], new["summary.json"])
    )
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if a == b:
            continue
        if isinstance(a, list) and isinstance(b, list):
            if len(a) != len(b):
                return f"{name}: {len(a)} rows before, {len(b)} now"
            i = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
            return f"{name} row {i + 1}: before {a[i]}, now {b[i]}"
        return f"{name}: before {a}, now {b}"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ref", required=True, help="the earlier commit to compare against")
    parser.add_argument("--only", nargs="+", choices=list(RUNS), default=list(RUNS), help="which runs (default: all)")
    args = parser.parse_args()
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        old_tree = os.path.join(tmp, "ref")
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", old_tree, args.ref], check=True,
                       capture_output=True)  # fmt: skip
        try:
            for name in args.only:
                script, flags = RUNS[name]
                old = outputs(run(old_tree, script, flags, os.path.join(tmp, name, "ref")))
                new = outputs(run(ROOT, script, flags, os.path.join(tmp, name, "new")))
                diff = first_difference(old, new)
                print(f"{name:>14} ({script}): {'DIFFERENT: ' + diff if diff else 'SAME'}", flush=True)
                failed += diff is not None
        finally:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", old_tree], check=False)
    print(f"{len(args.only) - failed} of {len(args.only)} runs the same as {args.ref}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
