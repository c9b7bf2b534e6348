"""Sensitivity of DDPL to the number of denoising steps K and the noise schedule (paper Fig. 5), on SMAX.

Runs `ddpl_smax.py` (3 seeds vmapped, the script's defaults otherwise) for K in {5, 10, 20, 50} with the cosine
schedule and for the linear, cosine and vp schedules with K = 20 (the cosine K = 20 run serves both sweeps), then
prints a Markdown table of the final and best evaluation return and the final win rate (mean +- std over seeds) and
saves one figure with both sweeps.

    python benchmarks/sensitivity.py                                  # the CPU budget (see docs/benchmarks.md)
    python benchmarks/sensitivity.py --total-timesteps 2000000 --learning-starts 10000 --eval-every 100000  # a GPU
    python benchmarks/sensitivity.py --ks 5,20 --schedules cosine     # a subset
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEDULES = ("linear", "cosine", "vp")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--map", default="3s_vs_5z", help="SMAX map (default: 3s_vs_5z, as the paper's Fig. 5)")
    parser.add_argument("--total-timesteps", type=int, default=10_000, help="env steps per seed and setting")
    parser.add_argument("--learning-starts", type=int, default=2_500, help="random env steps before updates")
    parser.add_argument("--eval-every", type=int, default=5_000, help="env steps between evaluations")
    parser.add_argument("--num-seeds", type=int, default=3, help="seeds per setting, vmapped in one process")
    parser.add_argument("--ks", default="5,10,20,50", help="K values swept with the cosine schedule")
    parser.add_argument("--schedules", default=",".join(SCHEDULES), help="schedules swept with K = 20")
    parser.add_argument("--figure", default=None, help="where to save the figure (default: in --runs-dir)")
    parser.add_argument("--runs-dir", default=os.path.join(ROOT, "runs"), help="parent folder of the run folders")
    args = parser.parse_args()
    try:
        ks = [int(k) for k in args.ks.split(",")]
    except ValueError:
        ks = []
    schedules = args.schedules.split(",")
    if not ks or min(ks) < 1 or not set(schedules) <= set(SCHEDULES) or args.total_timesteps < args.eval_every:
        print(f"error: --ks takes positive integers (e.g. 5,10,20,50), --schedules a subset of {','.join(SCHEDULES)}, "
              "and --total-timesteps must be >= --eval-every", file=sys.stderr)  # fmt: skip
        return 2

    settings = [(k, "cosine") for k in ks] + [(20, s) for s in schedules if (20, s) not in [(k, "cosine") for k in ks]]
    stamp = int(time.time())
    results, start = {}, time.time()
    for k, schedule in settings:
        exp_name = f"sensitivity_K{k}_{schedule}_{stamp}"
        cmd = [
            sys.executable, os.path.join(ROOT, "ddpl_smax.py"), "--map", args.map, "--exp-name", exp_name,
            "--num-seeds", str(args.num_seeds), "--total-timesteps", str(args.total_timesteps),
            "--learning-starts", str(args.learning_starts), "--eval-every", str(args.eval_every),
            "--num-diffusion-steps", str(k), "--noise-schedule", schedule, "--runs-dir", args.runs_dir,
        ]  # fmt: skip
        print(f"[{len(results) + 1}/{len(settings)}] running:", " ".join(cmd), flush=True)
        if subprocess.run(cmd).returncode != 0:
            print(f"error: ddpl_smax.py failed for K={k}, {schedule}", file=sys.stderr)
            return 1
        (run_dir,) = [os.path.join(args.runs_dir, d) for d in os.listdir(args.runs_dir) if f"__{exp_name}__" in d]
        with open(os.path.join(run_dir, "summary.json")) as f:
            results[(k, schedule)] = json.load(f) | {"run_dir": run_dir}

    minutes = (time.time() - start) / 60
    print(f"\nSMAX {args.map}: {args.num_seeds} seeds x {args.total_timesteps} env steps per setting "
          f"({args.learning_starts} random), {minutes:.1f} min in all")  # fmt: skip
    print("| K | schedule | final eval return | best eval return | final win rate | env steps/s per seed |")
    print("|---|---|---|---|---|---|")
    for (k, schedule), s in results.items():
        final, best, win = s["final_eval_return"], s["best_eval_return"], s["final_win_rate"]
        print(f"| {k} | {schedule} | {final['mean']:.3f} +- {final['std']:.3f} | {best['mean']:.3f} | "
              f"{win['mean']:.2f} +- {win['std']:.2f} | {s['sps']} |")  # fmt: skip

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    for ax, sweep, label in ((axes[0], [(k, "cosine") for k in ks], "K (cosine)"),
                             (axes[1], [(20, s) for s in schedules], "schedule (K = 20)")):  # fmt: skip
        sweep = [key for key in sweep if key in results]
        finals = [results[key]["final_eval_return"] for key in sweep]
        ticks = [str(k) if label.startswith("K") else s for k, s in sweep]
        ax.errorbar(range(len(sweep)), [f["mean"] for f in finals], [f["std"] for f in finals], fmt="o", capsize=4)
        for i, f in enumerate(finals):
            ax.plot([i] * len(f["per_seed"]), f["per_seed"], ".", color="grey", alpha=0.6)
        ax.set_xticks(range(len(sweep)), ticks)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"final eval return ({args.total_timesteps} steps)")
    fig.suptitle(f"DDPL on SMAX {args.map}: mean +- std over {args.num_seeds} seeds (grey: seeds)")
    fig.tight_layout()
    figure = args.figure or os.path.join(args.runs_dir, f"sensitivity_{args.map}_{stamp}.png")
    fig.savefig(figure, dpi=120)
    print(f"figure: {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
