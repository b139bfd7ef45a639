#!/usr/bin/env bash
# fastattn's two entry points; each sets itself up on a fresh machine first.
#   ./run.sh bench [args]   the main job: `fastattn bench` (GPU timings, or the CPU report where no GPU is found)
#   ./run.sh test  [args]   the test suite (on a CPU it runs the Triton kernels through the interpreter), in
#                           parallel on every core (pytest-xdist) unless the arguments choose (-n N, -p no:xdist)
#   ./run.sh lint           ruff, with the project's configuration
# Set-up goes into ./.venv once. A machine whose python3 already has torch and triton (the GPU images) reuses
# them and installs nothing from the network; elsewhere the CPU build of torch 2.13 is installed before anything
# else, since an unpinned torch pulls gigabytes of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")"

VENV=.venv
PY=${PYTHON:-python3}
STAMP="$VENV/.fastattn-setup"

setup() {
  if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && [ "$STAMP" -nt run.sh ]; then
    return
  fi
  echo "run.sh: setting up $VENV (once)" >&2
  if "$PY" -c "import torch, triton" >/dev/null 2>&1; then
    "$PY" -m venv --system-site-packages "$VENV"
    "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
    if ! "$VENV/bin/python" -c "import pytest, pytest_benchmark, xdist, hypothesis, ruff" >/dev/null 2>&1; then
      "$VENV/bin/python" -m pip install -q pytest pytest-benchmark pytest-xdist hypothesis ruff
    fi
  else
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q torch==2.13.0
    "$VENV/bin/python" -m pip install -q -e ".[test,bench]"
  fi
  touch "$STAMP"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  test)
    setup
    workers=()
    case " $* " in
      *" -n "*|*" -n="*|*" --numprocesses"*|*"no:xdist"*) ;;
      *) workers=(-n "${FASTATTN_TEST_WORKERS:-auto}") ;;
    esac
    exec "$VENV/bin/python" -m pytest "${workers[@]}" "$@"
    ;;
  lint)
    setup
    exec "$VENV/bin/python" -m ruff check fastattn kernels tests bench
    ;;
  bench)
    setup
    exec "$VENV/bin/python" -m fastattn.cli bench "$@"
    ;;
  *)
    echo "usage: ./run.sh bench [args] | ./run.sh test [pytest args] | ./run.sh lint" >&2
    exit 2
    ;;
esac
