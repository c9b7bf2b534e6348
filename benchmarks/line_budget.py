"""Where the lines of each script go: the ledger behind issue 24's line targets (issue 19's before it).

    python benchmarks/line_budget.py

Counts `wc -l` lines of every top-level script (run `ruff format` first: the targets are counted after it) and splits
them into: the module header and imports, `Args`, the DDPL core and the harness (the two blocks shared across
scripts), `make_train`, `validate`, `main`, and the rest (env glue, other helpers, the blank lines between them).
`fixed` is what every script carries before its own code: header and imports, Args, core and harness. `room` is what
issue 24's target leaves for everything else, against `own`, what the script's own code takes now.
"""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = {  # issue 24; the harness block: <= 80 lines, main: <= 90
    "ddpl_mpe.py": 580,
    "ddpl_smax.py": 620,
    "ddpl_mamujoco.py": 700,
    "ddpl_isaaclab.py": 650,
    "ddpl_gaussian_ablation.py": 950,
    "toy_failure_mode.py": 520,
}
BLOCKS = {"core": "DDPL core", "harness": "harness"}


def ledger(path: str) -> dict:
    text = open(path).read()
    lines = text.splitlines()
    row = {"total": len(lines)}
    for name, marker in BLOCKS.items():
        begin = [i for i, line in enumerate(lines) if f"# --- {marker}: begin ---" in line]
        end = [i for i, line in enumerate(lines) if f"# --- {marker}: end ---" in line]
        row[name] = end[0] - begin[0] + 1 if begin and end else 0
    spans = {}
    for node in ast.parse(text).body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef) and node.name in ("Args", "make_train", "validate", "main"):
            spans[node.name] = (node.lineno - len(node.decorator_list), node.end_lineno)
    row["header"] = min(start for start, _ in spans.values()) - 1
    for name, (start, end) in spans.items():
        row[name] = end - start + 1
    row["fixed"] = row["header"] + row.get("Args", 0) + row["core"] + row["harness"]
    row["own"] = row["total"] - row["fixed"]
    return row


def main():
    columns = ["total", "header", "Args", "core", "harness", "make_train", "validate", "main", "fixed", "own"]
    print(f"{'script':27s}" + "".join(f"{c:>11s}" for c in columns) + f"{'target':>8s}{'room':>6s}")
    for script, target in TARGETS.items():
        row = ledger(os.path.join(ROOT, script))
        cells = "".join(f"{row.get(c, 0):11d}" for c in columns)
        print(f"{script:27s}{cells}{target:8d}{target - row['fixed']:6d}")


if __name__ == "__main__":
    main()
