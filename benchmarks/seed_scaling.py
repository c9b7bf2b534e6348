"""Seeds per second: one JAX-native script run with different --num-seeds, one after the other, on this machine.

Each setting trains the script's defaults for --total-timesteps env steps per seed (vmapped seeds, split over all
local devices) and reports the wall time, the compile time and the training throughput from its summary.json. Seeds
are independent, so "seed-steps/s" (env steps per second per seed x seeds) is the figure that says how much one
process gains from running more seeds at once. The settings run back to back, so a busy machine skews them alike
only if its load is steady: run it on an idle machine.

    python benchmarks/seed_scaling.py                                     # ddpl_mpe.py, 1 vs 4 seeds, 20k steps
    python benchmarks/seed_scaling.py --script ddpl_smax.py --seeds 1,8   # e.g. on a GPU
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("ddpl_mpe.py", "ddpl_smax.py", "ddpl_gaussian_ablation.py")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--script", default="ddpl_mpe.py", help=f"one of {', '.join(SCRIPTS)}")
    parser.add_argument("--seeds", default="1,4", help="comma-separated --num-seeds values, run in this order")
    parser.add_argument("--total-timesteps", type=int, default=20_000, help="env steps per seed and setting")
    parser.add_argument("--eval-every", type=int, default=10_000, help="env steps between evaluations")
    parser.add_argument("--runs-dir", default=os.path.join(ROOT, "runs"), help="parent folder of the run folders")
    args, extra = parser.parse_known_args()  # anything else goes to the script, e.g. --map 3s_vs_5z
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        seeds = []
    if args.script not in SCRIPTS or not seeds or min(seeds) < 1 or args.total_timesteps < args.eval_every:
        print(f"error: --script one of {', '.join(SCRIPTS)}; --seeds positive integers like 1,4; "
              "--total-timesteps >= --eval-every", file=sys.stderr)  # fmt: skip
        return 2

    tag, results = int(time.time()), []
    for n in seeds:
        exp_name = f"seed_scaling_{n}_{tag}"
        cmd = [
            sys.executable, os.path.join(ROOT, args.script), "--exp-name", exp_name, "--num-seeds", str(n),
            "--total-timesteps", str(args.total_timesteps), "--eval-every", str(args.eval_every),
            "--runs-dir", args.runs_dir, *extra,
        ]  # fmt: skip
        print("running:", " ".join(cmd), flush=True)
        start = time.time()
        if subprocess.run(cmd).returncode != 0:
            print(f"error: {args.script} failed with --num-seeds {n}", file=sys.stderr)
            return 1
        wall = time.time() - start
        (run_dir,) = [os.path.join(args.runs_dir, d) for d in os.listdir(args.runs_dir) if f"__{exp_name}__" in d]
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
        results.append((n, summary["num_devices"], wall, summary["sps"]))

    print(f"\n{args.script}, {args.total_timesteps} env steps per seed, {os.cpu_count()} CPU threads")
    print("| seeds | devices | wall time s | env steps/s per seed | seed-steps/s | x the first row |")
    print("|---|---|---|---|---|---|")
    base = results[0][0] * results[0][3]
    for n, devices, wall, sps in results:
        print(f"| {n} | {devices} | {wall:.0f} | {sps:.0f} | {n * sps:.0f} | {n * sps / base:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
