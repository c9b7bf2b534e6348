#!/usr/bin/env bash
# The prepared GPU check: paper Table 2 on the GPU (benchmarks/timing.py: ms per update and per action selection),
# then as much of a full-budget MPE run (ddpl_mpe.py, 2M env steps, 1 seed) as fits, everything in one results folder,
# in at most GPU_REPRODUCE_SECONDS (default 450 s, so the whole call stays under 8 minutes).
#
#   bash benchmarks/gpu_reproduce.sh [--smoke] [RESULTS_DIR]    # RESULTS_DIR defaults to runs/gpu_reproduce
#   bash benchmarks/gpu_reproduce.sh --fetch-wheels              # here, with PyPI: the wheels the GPU machine lacks
#
# --smoke runs the same steps with tiny budgets on whatever JAX device there is (tests/test_benchmarks.py runs it on
# the CPU). The results folder holds at most 8 files, none in subfolders that matter (the device tool returns 8):
#   env.txt          backend, devices, package versions
#   timing.txt       timing.py's output; its last line is `ratios: DDPL/DACER=x DDPL/Gaussian=y`
#   mpe.log          ddpl_mpe.py's output (stopped with SIGINT when the time is up: exit 130, no summary.json)
#   mpe_metrics.csv  one row per evaluation (every 100k env steps), copied from the run folder
#   mpe_config.json  the run's flags; mpe_summary.json only if the 2M steps finished
#   done.txt         one line per step with its exit code and seconds
#
# On the `device` tool's GPU machine (JAX with CUDA installed; jaxmarl, gymnax, gymnasium and tyro missing, and no
# network), after --fetch-wheels here (.whl/ is git-ignored):
#   run(command="bash benchmarks/gpu_reproduce.sh $OUT", carry=[".whl"], timeout_s=540)
# The script installs .whl/*.whl into /tmp/site (pip --no-deps --target) when the folder exists.
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(jaxmarl==0.2.0 gymnax==1.0.1 gymnasium==1.3.0 farama-notifications==0.0.4 tyro==1.0.17
    docstring-parser==0.17.0 typeguard==4.4.4)
if [ "${1:-}" = "--fetch-wheels" ]; then
    # pure-Python wheels for the GPU machine's Python 3.12; no dependencies: the machine has jax, flax, optax, chex,
    # numpy, matplotlib, seaborn, tqdm, typing-extensions (device/KINDS.md)
    grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
    exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
fi
SMOKE=0
if [ "${1:-}" = "--smoke" ]; then
    SMOKE=1
    shift
fi
case "${1:-}" in -*)
    echo "error: unknown option $1; usage: bash benchmarks/gpu_reproduce.sh [--smoke] [RESULTS_DIR] | --fetch-wheels" >&2
    exit 2
    ;;
esac
RESULTS="${1:-runs/gpu_reproduce}"
mkdir -p "$RESULTS"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if [ -d .whl ] && compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
BUDGET="${GPU_REPRODUCE_SECONDS:-450}"
: >"$RESULTS/done.txt"
record() { echo "$1 exit=$2 seconds=$SECONDS" | tee -a "$RESULTS/done.txt"; }

"$PY" - >"$RESULTS/env.txt" 2>&1 <<'EOF'
import importlib.metadata as md, os, platform, jax
print("backend", jax.default_backend(), "devices", jax.devices(), "cpu threads", os.cpu_count())
print("python", platform.python_version())
for name in ("jax", "jaxlib", "flax", "optax", "chex", "numpy", "jaxmarl", "gymnax", "tyro"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "missing")
EOF
record env $?
cat "$RESULTS/env.txt"

# Table 2: every method of timing.py (the smoke run: the three of the ratios line plus ddpl-full-batch, tiny nets)
if [ "$SMOKE" = 1 ]; then
    TIMING=(--rounds 1 --batch-size 8 --hidden-size 16 --num-diffusion-steps 3 --methods ddpl,ddpl-full-batch,dacer,gaussian)
else
    TIMING=(--rounds 30)
fi
timeout -k 10 "$((BUDGET / 2))" "$PY" benchmarks/timing.py "${TIMING[@]}" 2>&1 | tee "$RESULTS/timing.txt"
record timing "${PIPESTATUS[0]}"

# as much of the full-budget MPE run as the remaining time allows; SIGINT ends it between chunks (exit 130)
if [ "$SMOKE" = 1 ]; then
    MPE=(--total-timesteps 400 --eval-every 200 --num-envs 4 --learning-starts 100 --batch-size 16 --hidden-size 16
        --num-diffusion-steps 3 --num-eval-episodes 2 --buffer-size 400)
else
    MPE=(--total-timesteps 2000000 --eval-every 100000)
fi
LEFT=$((BUDGET - SECONDS - 20))
if [ "$LEFT" -gt 30 ]; then
    RUNS="$(mktemp -d)"  # the run folder stays outside RESULTS: only the files above come back from the device
    timeout -s INT -k 30 "$LEFT" "$PY" ddpl_mpe.py "${MPE[@]}" --num-seeds 1 --exp-name gpu_reproduce \
        --runs-dir "$RUNS" >"$RESULTS/mpe.log" 2>&1
    record mpe $?
    for f in metrics.csv config.json summary.json; do
        compgen -G "$RUNS/*/$f" >/dev/null && cp "$RUNS"/*/"$f" "$RESULTS/mpe_$f"
    done
    rm -rf "$RUNS"
    tail -n 3 "$RESULTS/mpe.log"
else
    record mpe-skipped-no-time 0
fi
grep -q "^timing exit=0" "$RESULTS/done.txt" && ! grep -q "^env exit=[^0]" "$RESULTS/done.txt"
