"""Merge run folders of the DDPL scripts into one paper-style table (Table 1) and one learning-curve figure.

Each RUN_DIR is a complete run folder (config.json, metrics.csv, summary.json) of ddpl_mpe.py, ddpl_smax.py,
ddpl_gaussian_ablation.py, ddpl_mamujoco.py or ddpl_isaaclab.py. Runs of the same script, task and method are merged
into one group with all their seeds, so seed blocks trained by separate processes or machines
(`--seed 0 --num-seeds 4`, `--seed 4 --num-seeds 4`) make one row. Within a group every setting must agree except
the per-process ones (seed, num_seeds, exp_name, runs_dir, W&B, save/probe flags), and no seed may appear twice;
otherwise the script exits with code 2 naming the differing keys or the repeated seeds. Groups of different
scripts, tasks or methods (the ablation's `policy` column) sit side by side.

The statistics are the scripts' own: "best" is the evaluation step at which the mean over all seeds is highest
(Table 1), reported as mean +- std over seeds at that step; "final" is the last evaluation. The std is over seeds
(numpy's default, ddof 0), as in summary.json.

    python benchmarks/aggregate.py runs/MPE_*__ddpl_mpe__0__* runs/MPE_*__ddpl_mpe__4__* --out-dir runs/table
"""

import argparse
import csv
import json
import math
import os
import sys

import numpy as np

PER_PROCESS_KEYS = {  # settings that may differ between the processes of one group
    "exp_name", "seed", "num_seeds", "runs_dir", "track", "wandb_project_name", "wandb_entity", "save_model",
    "probe_every", "compare", "policy",
}  # fmt: skip
# `compare` and `policy` of the ablation script: the method comes from the metrics' `policy` column instead


class InputError(Exception):
    """Bad input: reported as one line, exit code 2."""


def load_run(run_dir: str) -> dict:
    """config, summary and the evaluation rows (method, step, seed, return, win rate) of one complete run folder."""
    files = {name: os.path.join(run_dir, name) for name in ("config.json", "summary.json", "metrics.csv")}
    if not os.path.isdir(run_dir):
        raise InputError(f"{run_dir}: not a folder")
    if not os.path.isfile(files["summary.json"]):
        raise InputError(f"{run_dir}: no summary.json, so the run is incomplete (interrupted or still running)")
    with open(files["config.json"]) as f:
        config = json.load(f)
    with open(files["summary.json"]) as f:
        summary = json.load(f)
    script = summary["script"].removesuffix(".py")
    evals = []
    with open(files["metrics.csv"], newline="") as f:
        for row in csv.DictReader(f):
            value = row.get("episodic_return", "")
            if value in ("", None) or not math.isfinite(float(value)):
                continue  # a training-only row (or a failed evaluation, written as "" or nan)
            method = f"{script}/{row['policy']}" if row.get("policy") else script
            win = row.get("win_rate", "")
            win = float(win) if win not in ("", None) and math.isfinite(float(win)) else None
            evals.append((method, int(row["global_step"]), int(row["seed"]), float(value), win))
    if not evals:
        raise InputError(f"{run_dir}: metrics.csv has no evaluation rows")
    return {"dir": run_dir, "config": config, "task": summary["env_id"], "evals": evals}


def group_runs(runs: list[dict]) -> dict:
    """{(task, method): {"runs": [...], "evals": {(step, seed): (return, win)}}}, checking configs and seeds."""
    groups = {}
    for run in runs:
        for method, step, seed, ret, win in run["evals"]:
            group = groups.setdefault((run["task"], method), {"runs": [], "evals": {}, "seed_runs": {}})
            if run not in group["runs"]:
                group["runs"].append(run)
            owner = group["seed_runs"].setdefault(seed, run["dir"])
            if owner != run["dir"]:
                raise InputError(f"{run['task']} {method}: seed {seed} is in both {owner} and {run['dir']}")
            group["evals"][(step, seed)] = (ret, win)
    for (task, method), group in groups.items():
        first = group["runs"][0]
        for run in group["runs"][1:]:
            keys = sorted(set(first["config"]) | set(run["config"]))
            differ = [k for k in keys if k not in PER_PROCESS_KEYS and first["config"].get(k) != run["config"].get(k)]
            if differ:
                detail = ", ".join(f"{k} ({first['config'].get(k)!r} vs {run['config'].get(k)!r})" for k in differ)
                raise InputError(f"{task} {method}: {first['dir']} and {run['dir']} differ in {detail}")
        steps = sorted({step for step, _ in group["evals"]})
        seeds = sorted(group["seed_runs"])
        missing = [(s, sd) for s in steps for sd in seeds if (s, sd) not in group["evals"]]
        if missing:
            raise InputError(f"{task} {method}: evaluation steps differ between runs, e.g. step {missing[0][0]} "
                             f"is missing for seed {missing[0][1]}")  # fmt: skip
        group["steps"], group["seeds"] = steps, seeds
        group["returns"] = np.array([[group["evals"][(s, sd)][0] for sd in seeds] for s in steps])  # (step, seed)
        wins = [[group["evals"][(s, sd)][1] for sd in seeds] for s in steps]
        group["wins"] = None if any(w is None for r in wins for w in r) else np.array(wins)
    return groups


def table_rows(groups: dict) -> list[dict]:
    """One row per group: best (Table 1's statistic) and final evaluation, mean and std over all seeds."""
    rows = []
    for (task, method), g in sorted(groups.items()):
        best = int(np.argmax(g["returns"].mean(axis=1)))
        row = {"task": task, "method": method, "num_seeds": len(g["seeds"]), "seeds": " ".join(map(str, g["seeds"]))}
        row |= {"num_runs": len(g["runs"]), "final_step": g["steps"][-1], "best_step": g["steps"][best]}
        row |= {"best_mean": g["returns"][best].mean(), "best_std": g["returns"][best].std()}
        row |= {"final_mean": g["returns"][-1].mean(), "final_std": g["returns"][-1].std()}
        if g["wins"] is not None:
            row |= {"final_win_rate_mean": g["wins"][-1].mean(), "final_win_rate_std": g["wins"][-1].std()}
        rows.append(row)
    return rows


def markdown(rows: list[dict], decimals: int) -> str:
    """Table 1's form: tasks as rows, methods as columns, best mean +- std over seeds (seeds, steps underneath)."""
    tasks = sorted({r["task"] for r in rows})
    methods = sorted({r["method"] for r in rows})
    cell = {(r["task"], r["method"]): r for r in rows}
    lines = ["| task | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for task in tasks:
        cells = []
        for m in methods:
            r = cell.get((task, m))
            cells.append(
                f"{r['best_mean']:.{decimals}f} ± {r['best_std']:.{decimals}f} "
                f"({r['num_seeds']} seeds, {r['final_step']:,} steps)"
                if r
                else "-"
            )
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(groups: dict, path: str):
    """One panel per task: each method's mean eval return over seeds, with a band of one std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({task for task, _ in groups})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for (t, method), g in sorted(groups.items()):
            if t != task:
                continue
            mean, std = g["returns"].mean(axis=1), g["returns"].std(axis=1)
            ax.plot(g["steps"], mean, label=f"{method} ({len(g['seeds'])} seeds)")
            ax.fill_between(g["steps"], mean - std, mean + std, alpha=0.25)
        ax.set(title=task, xlabel="environment steps per seed", ylabel="eval return (mean, std over seeds)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="complete run folders (with summary.json)")
    parser.add_argument("--out-dir", default="runs/aggregate", help="where table.md, table.csv and the figure go")
    parser.add_argument("--decimals", type=int, default=2, help="decimals in the Markdown table (default 2)")
    args = parser.parse_args()
    try:
        groups = group_runs([load_run(d.rstrip("/")) for d in args.run_dirs])
    except (InputError, OSError, KeyError, ValueError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = table_rows(groups)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "table.csv"), "w", newline="") as f:
        fields = list(dict.fromkeys(k for r in rows for k in r))
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    table = markdown(rows, args.decimals)
    with open(os.path.join(args.out_dir, "table.md"), "w") as f:
        f.write(table + "\n")
    plot(groups, os.path.join(args.out_dir, "learning_curves.png"))
    print(table)
    print(f"wrote {args.out_dir}/table.md, table.csv, learning_curves.png ({len(args.run_dirs)} run folders)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
