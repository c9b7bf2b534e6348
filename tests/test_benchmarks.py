"""benchmarks/timing.py as a user (or a tool reading its last line) runs it: tiny settings, CPU."""

import re
import subprocess
import sys

from conftest import REPO_ROOT

TIMING = str(REPO_ROOT / "benchmarks" / "timing.py")


def test_timing_prints_a_table_and_the_ratios_line_last():
    cmd = [sys.executable, TIMING, "--rounds", "1", "--batch-size", "8", "--methods", "ddpl,dacer,gaussian"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    for method in ("ddpl", "dacer", "gaussian"):
        row = [line.split() for line in lines if line.split()[:1] == [method]]
        assert row and float(row[0][1]) > 0 and float(row[0][3]) > 0, (method, lines)
    match = re.fullmatch(r"ratios: DDPL/DACER=(\d+\.\d\d) DDPL/Gaussian=(\d+\.\d\d)", lines[-1])
    assert match, lines[-1]
    assert all(float(x) > 0 for x in match.groups())


def test_timing_rejects_unknown_methods_with_exit_code_2():
    cmd = [sys.executable, TIMING, "--methods", "ddpl,dacer,gaussian,sac"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error:") and "qvpo" in out.stderr and "Traceback" not in out.stderr
