"""Policy-class ablation benchmark (paper Fig. 4): DDPL vs the reverse-KL Gaussian, same seeds and budget.

Runs `ddpl_gaussian_ablation.py --compare` (3 seeds, vmapped) on one environment with the CPU configuration of
benchmarks/mpe_learning.py or smax_learning.py (issue 17; --table3: the DDPL scripts' defaults instead), then prints
per class the evaluation return (and win rate on SMAX) and the action spread during training, the final and best
values, and the difference between the classes. The default budgets are what a 2-core CPU finishes in about an hour
per environment, both classes together (docs/ddpl_gaussian_ablation.md). Flags it does not know go to the script.

    python benchmarks/gaussian_ablation.py --env mpe             # MPE Simple-Reference, 60k env steps per seed
    python benchmarks/gaussian_ablation.py --env smax            # SMAX 3s_vs_5z, 60k env steps per seed
    python benchmarks/gaussian_ablation.py --env smax --table3 --total-timesteps 2000000   # the GPU budget
    python ddpl_gaussian_ablation.py --env toy --compare         # the toy game, N = 1 and 2 (no benchmark needed)
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mpe_learning import CPU_CONFIG as MPE_CPU_CONFIG  # noqa: E402  (one CPU configuration per env, issue 17)
from smax_learning import CPU_CONFIG as SMAX_CPU_CONFIG  # noqa: E402

CPU_BUDGET = {"mpe": 60_000, "smax": 60_000}  # env steps per seed: about an hour on 2 cores, both classes
CPU_CONFIG = {"mpe": MPE_CPU_CONFIG, "smax": SMAX_CPU_CONFIG}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", choices=("mpe", "smax"), default="mpe", help="which environment (default: mpe)")
    parser.add_argument("--projection", choices=("reverse", "forward"), default="reverse", help="Gaussian projection")
    parser.add_argument("--total-timesteps", type=int, default=None, help="env steps per seed (default: CPU budget)")
    parser.add_argument("--table3", action="store_true", help="the script's defaults instead of the CPU configuration")
    parser.add_argument("--num-seeds", type=int, default=3, help="seeds, vmapped in one process")
    parser.add_argument("--eval-every", type=int, default=10_000, help="env steps between evaluations")
    parser.add_argument("--runs-dir", default=os.path.join(ROOT, "runs"), help="parent folder of the run folder")
    args, extra = parser.parse_known_args()
    total = args.total_timesteps or CPU_BUDGET[args.env]
    if total < args.eval_every or args.num_seeds < 1:
        print("error: need --total-timesteps >= --eval-every and --num-seeds >= 1", file=sys.stderr)
        return 2

    exp_name = f"ablation_{args.env}_{int(time.time())}"
    cmd = [
        sys.executable, os.path.join(ROOT, "ddpl_gaussian_ablation.py"), "--env", args.env, "--compare",
        "--projection", args.projection, "--exp-name", exp_name, "--num-seeds", str(args.num_seeds),
        "--total-timesteps", str(total), "--eval-every", str(args.eval_every),
        "--probe-every", str(args.eval_every * max(1, total // args.eval_every // 4)), "--runs-dir", args.runs_dir,
    ]  # fmt: skip
    cmd += ([] if args.table3 else CPU_CONFIG[args.env]) + extra
    print("running:", " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:
        print("error: ddpl_gaussian_ablation.py failed", file=sys.stderr)
        return 1
    (run_dir,) = [os.path.join(args.runs_dir, d) for d in os.listdir(args.runs_dir) if f"__{exp_name}__" in d]
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(run_dir, "metrics.csv"), newline="") as f:
        rows = list(csv.DictReader(f))

    labels = list(summary["comparison"])
    print(f"\n{summary['env_id']}: {args.num_seeds} seeds, {summary['total_timesteps']} env steps per seed and class, "
          f"{summary['wall_time_s'] / 60:.1f} min in all")  # fmt: skip
    print("eval return (mean +- std over seeds) during training" + (", win rate" if args.env == "smax" else ""))
    for step in sorted({int(r["global_step"]) for r in rows}):
        cells = []
        for label in labels:
            at = [r for r in rows if r["policy"] == label and int(r["global_step"]) == step]
            values = [float(r["episodic_return"]) for r in at]
            mean = sum(values) / len(values)
            std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
            wins = f" win {sum(float(r['win_rate']) for r in at) / len(at):.2f}" if args.env == "smax" else ""
            spread = sum(float(r["action_std"]) for r in at) / len(at)
            cells.append(f"{label} {mean:8.3f} +- {std:6.3f}{wins} std(a) {spread:.3f}")
        print(f"  {step:>9}: " + " | ".join(cells))
    for label, result in summary["comparison"].items():
        final, best = result["final_eval_return"], result["best_eval_return"]
        wins = f", final win rate {result['final_win_rate']['mean']:.2f}" if "final_win_rate" in result else ""
        print(f"{label:>18}: final {final['mean']:.3f} +- {final['std']:.3f}, best {best['mean']:.3f}{wins}, "
              f"{result['sps']} env steps/s per seed")  # fmt: skip
    d, g = (summary["comparison"][k]["final_eval_return"]["mean"] for k in labels)
    print(f"final mean return, diffusion minus Gaussian: {d - g:+.3f}")
    print(f"figures: {run_dir}/learning_curve.png, {run_dir}/probe.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
