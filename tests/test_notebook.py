"""notebooks/ddpl_colab.ipynb: cheap checks of the committed file. `.ci/run` executes it (DDPL_NOTEBOOK_TINY=1).

- it is valid nbformat and stripped (no outputs, no execution counts);
- its parameter cell reads the environment variables CI sets;
- every script it runs, or names in a `python script.py ...` command, exists and takes every flag it is given;
- the command lines of its runs, in the tiny and the short budget, pass each script's own validation.
"""

import contextlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import types
from functools import cache
from pathlib import Path

import nbformat
import pytest
import tyro

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "ddpl_colab.ipynb"
ENV_VARS = ("DDPL_REPO_URL", "DDPL_NOTEBOOK_TINY", "DDPL_NOTEBOOK_SKIP_INSTALL", "DDPL_NOTEBOOK_RUNS_DIR")
RUN_SCRIPTS = {"toy_failure_mode.py", "ddpl_mpe.py", "ddpl_smax.py"}  # what the notebook must run
FLAG = r"--[a-z0-9][a-z0-9-]*"


def load(path=NOTEBOOK):
    return nbformat.read(path, as_version=4)


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def cell_with(nb, text):
    (cell,) = [c for c in code_cells(nb) if text in c.source]
    return cell


def run_cells(nb):
    """The code cells that call run_script("<script>.py", ...)."""
    return [c for c in code_cells(nb) if re.search(r'run_script\(\s*"', c.source)]


def common_flags(nb):
    """The flags run_script adds to every command line (inside its def)."""
    body = re.search(r"^def run_script\(.*?(?=^\S)", cell_with(nb, "def run_script(").source, re.DOTALL | re.MULTILINE)
    return re.findall(rf'"({FLAG})"', body.group(0))


def recorded_runs(nb, tiny, backend, tmp_path, monkeypatch):
    """[(script, argv)] of the run cells, executed with run_script, display and Image replaced by stubs."""
    calls = []

    def run_script(script, *flags):
        calls.append((script, [str(f) for f in flags] + ["--runs-dir", str(tmp_path / "runs"), "--exp-name", "nb"]))
        run_dir = tmp_path / f"run{len(calls)}"
        run_dir.mkdir(parents=True)
        (run_dir / "summary.json").write_text("{}")
        return run_dir

    fake_display = types.ModuleType("IPython.display")
    fake_display.display = fake_display.Image = lambda *args, **kwargs: None
    monkeypatch.setitem(sys.modules, "IPython.display", fake_display)
    namespace = {"TINY": tiny, "BACKEND": backend, "NUM_DEVICES": 1, "run_script": run_script, "json": json}
    for cell in run_cells(nb):
        exec(cell.source, namespace)
    return calls


def markdown_commands(nb):
    """[(script, flags)] of the `python <script>.py ...` commands in the text cells (the full-budget pointers)."""
    commands = []
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for m in re.finditer(r"`python ([\w/]+\.py)([^`]*)`", cell.source):
                commands.append((m.group(1), re.findall(rf"(?<!\S)({FLAG})", m.group(2))))
    return commands


@cache
def help_flags(script):
    """The flags in `python <script> --help`. The repo-root scripts are imported (the validation test imports them
    anyway, and a subprocess would import JAX again); the others run as a subprocess."""
    saved_argv, saved_columns = sys.argv, os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "200"  # wide: the help box never wraps a flag name
    try:
        if "/" in script:
            res = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True)
            assert res.returncode == 0, res.stderr
            text = res.stdout
        else:
            module, out = importlib.import_module(script.removesuffix(".py")), io.StringIO()
            sys.argv = [script, "--help"]
            with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
                tyro.cli(module.Args)
            assert exit_info.value.code in (0, None)
            text = out.getvalue()
    finally:
        sys.argv = saved_argv
        if saved_columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = saved_columns
    return set(re.findall(FLAG, text))


def test_notebook_is_valid_and_stripped():
    nb = load()
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    for cell in code_cells(nb):
        assert cell.outputs == [] and cell.execution_count is None, f"outputs not stripped: {cell.source[:60]!r}"


def test_parameter_cell_reads_the_environment(monkeypatch):
    (cell,) = [c for c in code_cells(load()) if "parameters" in c.metadata.get("tags", [])]
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    defaults = {}
    exec(cell.source, defaults)
    assert defaults["TINY"] is False and defaults["SKIP_INSTALL"] is False
    assert "OWNER" in defaults["REPO_URL"]  # the placeholder, which the checkout cell refuses to clone
    assert defaults["RUNS_DIR"] == "runs/notebook"
    monkeypatch.setenv("DDPL_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("DDPL_NOTEBOOK_SKIP_INSTALL", "1")
    monkeypatch.setenv("DDPL_REPO_URL", "https://example.org/ddpl.git")
    monkeypatch.setenv("DDPL_NOTEBOOK_RUNS_DIR", "/tmp/somewhere")
    ci = {}
    exec(cell.source, ci)
    assert ci["TINY"] is True and ci["SKIP_INSTALL"] is True
    assert ci["REPO_URL"] == "https://example.org/ddpl.git" and ci["RUNS_DIR"] == "/tmp/somewhere"


def test_notebook_installs_requirements_without_the_test_section():
    """The install cell drops requirements.txt's "Tests and lint" section (the Jupyter packages CI needs would replace
    Colab's own); so the marker must exist, with the runtime pins before it and the CI ones after it."""
    assert '"# Tests and lint"' in cell_with(load(), "pip").source
    runtime, found, tests = (ROOT / "requirements.txt").read_text().partition("# Tests and lint")
    assert found
    assert re.search(r"^jax==", runtime, re.MULTILINE) and re.search(r"^jaxmarl==", runtime, re.MULTILINE)
    for name in ("pytest", "nbclient", "nbformat", "ipykernel"):
        assert not re.search(rf"^{name}\b", runtime, re.MULTILINE) and re.search(rf"^{name}==", tests, re.MULTILINE)


def test_ci_executes_the_notebook_tiny_without_writing_it_back():
    (line,) = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if 'jupyter" execute' in ln]
    assert "notebooks/ddpl_colab.ipynb" in line and "--inplace" not in line and "--output" not in line
    ci = (ROOT / ".ci" / "run").read_text()
    assert "DDPL_NOTEBOOK_TINY=1" in ci and "DDPL_NOTEBOOK_SKIP_INSTALL=1" in ci


@pytest.mark.parametrize("tiny", [True, False], ids=["tiny", "short"])
def test_run_command_lines_pass_the_scripts_validation(tiny, tmp_path, monkeypatch):
    """What each script does with the notebook's command line before it runs anything: tyro parses it (unknown flags
    and bad values exit 2) and validate() checks it. The short budget is never executed by CI, so this is its check."""
    calls = recorded_runs(load(), tiny, "gpu", tmp_path, monkeypatch)
    assert {script for script, _ in calls} == RUN_SCRIPTS
    for script, argv in calls:
        module = importlib.import_module(script.removesuffix(".py"))
        monkeypatch.setattr(sys, "argv", [script, *argv])
        assert module.validate(tyro.cli(module.Args)) is None, (script, argv)
    cpu_calls = recorded_runs(load(), tiny, "cpu", tmp_path / "cpu", monkeypatch)
    assert [script for script, _ in cpu_calls] == ["toy_failure_mode.py", "ddpl_mpe.py"]  # SMAX only on a GPU


def scripts_and_flags():
    nb = load()
    flags = {}
    for script, argv in recorded_runs_static(nb):
        flags.setdefault(script, set()).update(a for a in argv if re.fullmatch(FLAG, a))
    for script, command_flags in markdown_commands(nb):
        flags.setdefault(script, set()).update(command_flags)
    return flags


def recorded_runs_static(nb):
    """[(script, flags)] from the run cells' text, without running them: every "--flag" literal in the cell."""
    runs = []
    for cell in run_cells(nb):
        flags = re.findall(rf'"({FLAG})"', cell.source) + common_flags(nb)
        runs += [(script, flags) for script in re.findall(r'run_script\(\s*"([^"]+\.py)"', cell.source)]
    return runs


SCRIPTS_AND_FLAGS = scripts_and_flags()


def test_the_notebook_runs_the_three_scripts_and_points_to_full_budgets():
    assert RUN_SCRIPTS <= set(SCRIPTS_AND_FLAGS)
    assert {"--runs-dir", "--exp-name"} <= set(common_flags(load()))
    assert {script for script, _ in markdown_commands(load())} >= RUN_SCRIPTS


@pytest.mark.parametrize("script", sorted(SCRIPTS_AND_FLAGS))
def test_every_flag_is_in_the_scripts_help(script):
    assert (ROOT / script).is_file(), script
    missing = SCRIPTS_AND_FLAGS[script] - help_flags(script)
    assert not missing, f"{script} --help has no {sorted(missing)}"
