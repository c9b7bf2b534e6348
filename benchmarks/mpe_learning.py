"""Learning benchmark of ddpl_mpe.py on MPE Simple-Reference: 3 seeds, then eval return vs reference levels.

Runs `ddpl_mpe.py` once with the seeds vmapped and compares the final and best evaluation returns (mean over seeds;
per agent, 50 episodes per seed, stochastic policy) with the reference levels of issue 3, and the critic's value at
the evaluation episodes' first state with the discounted return they obtained. By default it runs the CPU
configuration (CPU_CONFIG below, docs/ddpl_mpe.md "CPU configuration"); --table3 runs the script's defaults (Table 3,
the full-budget GPU setting) instead. Flags it does not know go to ddpl_mpe.py as they are.

    python benchmarks/mpe_learning.py                                      # the CPU configuration, 3 seeds
    python benchmarks/mpe_learning.py --weight-rule batch                  # ... with a flag of ddpl_mpe.py changed
    python benchmarks/mpe_learning.py --table3 --total-timesteps 2000000   # Table 3 at the issue's budget (a GPU)
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV_ID = "MPE_simple_reference_v3"
# episode return per agent (26 steps), from issue 3
REFERENCE_LEVELS = [
    ("random policy", -28.2),
    ("standing still", -26.9),
    ("move to the landmarks' centroid (best without communication)", -17.9),
    ("oracle that knows its own goal", -9.1),
]
TARGET, TARGET_BUDGET = -14.0, 2_000_000
# more updates per env step (one per 4 env steps instead of one per 20), smaller and cheaper networks, a discount and
# a Polyak rate for 26-step episodes and a few thousand updates (issue 17; docs/ddpl_mpe.md "CPU configuration")
CPU_CONFIG = [
    "--num-envs", "4", "--hidden-size", "128", "--num-diffusion-steps", "10", "--gamma", "0.95", "--tau", "0.02",
    "--learning-starts", "5000",
]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--total-timesteps", type=int, default=100_000, help="env steps per seed")
    parser.add_argument("--table3", action="store_true", help="the script's defaults instead of the CPU configuration")
    parser.add_argument("--num-seeds", type=int, default=3, help="seeds, vmapped in one process")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--eval-every", type=int, default=10_000, help="env steps between evaluations")
    parser.add_argument("--runs-dir", default=os.path.join(ROOT, "runs"), help="parent folder of the run folder")
    args, extra = parser.parse_known_args()
    if args.total_timesteps < args.eval_every or args.num_seeds < 1:
        print("error: need --total-timesteps >= --eval-every and --num-seeds >= 1", file=sys.stderr)
        return 2

    exp_name = f"mpe_learning_{int(time.time())}"
    cmd = [
        sys.executable, os.path.join(ROOT, "ddpl_mpe.py"), "--env-id", ENV_ID, "--exp-name", exp_name,
        "--num-seeds", str(args.num_seeds), "--seed", str(args.seed), "--total-timesteps", str(args.total_timesteps),
        "--eval-every", str(args.eval_every), "--runs-dir", args.runs_dir,
    ]  # fmt: skip
    cmd += ([] if args.table3 else CPU_CONFIG) + extra
    print("running:", " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:
        print("error: ddpl_mpe.py failed", file=sys.stderr)
        return 1
    (run_dir,) = [os.path.join(args.runs_dir, d) for d in os.listdir(args.runs_dir) if f"__{exp_name}__" in d]
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(run_dir, "metrics.csv"), newline="") as f:
        rows = list(csv.DictReader(f))

    steps = sorted({int(r["global_step"]) for r in rows})
    print(f"\nDDPL on {ENV_ID}: {args.num_seeds} seeds, {summary['total_timesteps']} env steps per seed, "
          f"{summary['wall_time_s'] / 60:.1f} min, {summary['sps']} env steps/s per seed")  # fmt: skip
    print("eval return per agent (mean +- std over seeds) during training:")
    for s in steps:
        values = [float(r["episodic_return"]) for r in rows if int(r["global_step"]) == s]
        mean = sum(values) / len(values)
        std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
        q = sum(float(r["q_first"]) for r in rows if int(r["global_step"]) == s) / len(values)
        disc = sum(float(r["disc_return"]) for r in rows if int(r["global_step"]) == s) / len(values)
        print(f"  {s:>9} steps: {mean:8.2f} +- {std:5.2f}   critic at s_0 {q:7.2f}, discounted return {disc:7.2f}")
    final, best = summary["final_eval_return"], summary["best_eval_return"]
    print(f"final: {final['mean']:.2f} +- {final['std']:.2f}   per seed {[round(v, 2) for v in final['per_seed']]}")
    print(f"best:  {best['mean']:.2f} +- {best['std']:.2f}   (highest mean over seeds during training)")
    print("\nreference levels (per agent):")
    for name, level in REFERENCE_LEVELS + [(f"target of issue 3 (within {TARGET_BUDGET:,} steps)", TARGET)]:
        verdict = "beaten" if final["mean"] > level else "not reached"
        print(f"  {level:7.1f}  {name:<66} final mean {verdict}")
    if summary["total_timesteps"] < TARGET_BUDGET:
        print(f"note: {summary['total_timesteps']:,} steps per seed is below the target's {TARGET_BUDGET:,}: "
              "not a verdict on the target")  # fmt: skip
    print(f"run folder: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
