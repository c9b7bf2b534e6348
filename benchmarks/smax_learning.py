"""Learning benchmark of ddpl_smax.py on SMAX 3s_vs_5z: 3 seeds, then eval return and win rate vs reference levels.

Runs `ddpl_smax.py` once with the seeds vmapped and compares the evaluation return and win rate (mean over seeds;
50 episodes per seed, stochastic policy) with a random policy and the maximum return, and the critic's value at the
evaluation episodes' first state with the discounted return they obtained. The random policy is measured in the same
run: the first --learning-starts env steps act uniformly at random, and the training episodes that finish in the
first chunk are reported as such. By default it runs the CPU configuration (CPU_CONFIG below, docs/ddpl_smax.md);
--table3 runs the script's defaults (Table 3, the full-budget GPU setting). Unknown flags go to ddpl_smax.py.

    python benchmarks/smax_learning.py                                     # the CPU configuration, 3 seeds
    python benchmarks/smax_learning.py --table3 --total-timesteps 2000000  # the script's defaults (a GPU)
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_RETURN = 2.0  # all enemy health removed (1.0) + the win bonus (1.0)
# docs/environments.md, 200 episodes each on 3s_vs_5z: return, win rate
# one update per 4 env steps, smaller and cheaper networks, a faster Polyak rate, rewards x10 (issue 17)
CPU_CONFIG = [
    "--num-envs", "4", "--hidden-size", "128", "--num-diffusion-steps", "10", "--tau", "0.02", "--reward-scale", "10",
]  # fmt: skip
REFERENCE_LEVELS = [
    ("random policy (docs/environments.md)", 0.22, 0.0),
    ("stand and shoot nearest (docs/environments.md)", 0.30, 0.0),
]


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--map", default="3s_vs_5z", help="SMAX map (default: 3s_vs_5z)")
    parser.add_argument("--total-timesteps", type=int, default=60_000, help="env steps per seed")
    parser.add_argument("--table3", action="store_true", help="the script's defaults instead of the CPU configuration")
    parser.add_argument("--num-seeds", type=int, default=3, help="seeds, vmapped in one process")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--eval-every", type=int, default=10_000, help="env steps between evaluations")
    parser.add_argument("--runs-dir", default=os.path.join(ROOT, "runs"), help="parent folder of the run folder")
    args, extra = parser.parse_known_args()
    if args.total_timesteps < args.eval_every or args.num_seeds < 1:
        print("error: need --total-timesteps >= --eval-every and --num-seeds >= 1", file=sys.stderr)
        return 2

    exp_name = f"smax_learning_{int(time.time())}"
    cmd = [
        sys.executable, os.path.join(ROOT, "ddpl_smax.py"), "--map", args.map, "--exp-name", exp_name,
        "--num-seeds", str(args.num_seeds), "--seed", str(args.seed), "--total-timesteps", str(args.total_timesteps),
        "--eval-every", str(args.eval_every), "--learning-starts", str(args.eval_every), "--runs-dir", args.runs_dir,
    ]  # fmt: skip
    cmd += ([] if args.table3 else CPU_CONFIG) + extra
    print("running:", " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:
        print("error: ddpl_smax.py failed", file=sys.stderr)
        return 1
    (run_dir,) = [os.path.join(args.runs_dir, d) for d in os.listdir(args.runs_dir) if f"__{exp_name}__" in d]
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(run_dir, "metrics.csv"), newline="") as f:
        rows = list(csv.DictReader(f))

    steps = sorted({int(r["global_step"]) for r in rows})
    print(f"\nDDPL on SMAX {args.map}: {args.num_seeds} seeds, {summary['total_timesteps']} env steps per seed, "
          f"{summary['wall_time_s'] / 60:.1f} min, {summary['sps']} env steps/s per seed")  # fmt: skip
    print("evaluation (mean +- std over seeds; 50 episodes per seed) and training episodes during training:")
    for s in steps:
        at = [r for r in rows if int(r["global_step"]) == s]
        ret, win = (mean_std([float(r[k]) for r in at]) for k in ("episodic_return", "win_rate"))
        train, train_win = (mean_std([float(r[k]) for r in at]) for k in ("train_return", "train_win_rate"))
        q, disc = (mean_std([float(r[k]) for r in at])[0] for k in ("q_first", "disc_return"))
        print(f"  {s:>9} steps: eval return {ret[0]:.3f} +- {ret[1]:.3f}, win rate {win[0]:.2f} +- {win[1]:.2f}"
              f" | training return {train[0]:.3f}, win rate {train_win[0]:.2f}"
              f" | critic at s_0 {q:.3f}, discounted return (scaled) {disc:.3f}")  # fmt: skip
    random_now = mean_std([float(r["train_return"]) for r in rows if int(r["global_step"]) == steps[0]])
    final, best, win = summary["final_eval_return"], summary["best_eval_return"], summary["final_win_rate"]
    print(f"final: return {final['mean']:.3f} +- {final['std']:.3f} per seed {[round(v, 3) for v in final['per_seed']]}"
          f", win rate {win['mean']:.2f} per seed {win['per_seed']}")  # fmt: skip
    print(f"best:  return {best['mean']:.3f} +- {best['std']:.3f}   (highest mean over seeds during training)")
    print("\nreference levels (return, win rate):")
    levels = [(f"random policy, this run's first {steps[0]} steps", random_now[0], None), *REFERENCE_LEVELS]
    for name, level, level_win in levels + [("maximum", MAX_RETURN, 1.0)]:
        verdict = "above" if final["mean"] > level else "not above"
        wins = "" if level_win is None else f", win rate {level_win:.2f}"
        print(f"  {level:6.3f}{wins:<16} {name:<48} final mean return {verdict}")
    print(f"run folder: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
