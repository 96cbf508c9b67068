#!/usr/bin/env bash
# GPU readiness check for `arun --backend cuda`: one prepared run on a bare GPU machine (no network),
# under 8 minutes on an H100/H200, stopping by itself; `--cpu` runs the same at tiny scale anywhere.
#
# Build the wheel folder HERE (a machine with the package registries), for the GPU machine's Python 3.12.
# Its own torch, triton, numpy, pyarrow, rich, click, filelock, requests, tiktoken, matplotlib and pytest
# are used as they are; the wheels are what arun needs beyond them:
#
#   pip download --no-deps -d wheels/ --python-version 3.12 --only-binary=:all: \
#       --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any \
#       rustbpe gitpython gitdb smmap plotly narwhals
#
# (add any package `pip install --no-deps` reports missing there; `pip check` in the log lists them)
# Then, from the repo root on the GPU machine:
#
#   bash benchmarks/gpu_check.sh --wheels wheels/            # upstream profile, 75 s run, every attention kernel
#   bash benchmarks/gpu_check.sh --cpu                       # tiny profile on the CPU device (no GPU, no wheels)
#
# Logs, the run's record and the table go to $OUT when it is set. Other flags pass through to
# benchmarks/gpu_check.py (--budget S, --profile NAME). Exit status: 0 when every step passed.
set -u

cd "$(dirname "$0")/.." || exit 2
WHEELS=""
ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) WHEELS="${2:-}"; shift 2 || { echo "error: --wheels needs a folder" >&2; exit 2; } ;;
        *) ARGS+=("$1"); shift ;;
    esac
done
PY="${PYTHON:-python3}"
TMP_ROOT="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-XXXXXX")"
trap 'rm -rf "$TMP_ROOT"' EXIT
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT"; fi

log() { echo "$*"; if [ -n "${OUT:-}" ]; then echo "$*" >> "$OUT/gpu_check.sh.log"; fi; }

# 1. Offline install: the carried wheels into a private venv that sees the machine's own packages
# (the project itself runs from this tree). Without the venv module, or when $PY is itself a venv
# whose torch the new one would not see: a --target folder on PYTHONPATH, which serves the harness (the train and evaluator processes need none of the wheels).
EXTRA_PATH=""
if [ -n "$WHEELS" ]; then
    if ls "$WHEELS"/*.whl > /dev/null 2>&1; then
        if "$PY" -m venv --system-site-packages "$TMP_ROOT/venv" \
            && "$TMP_ROOT/venv/bin/python" -c 'import torch' 2> /dev/null \
            && "$TMP_ROOT/venv/bin/python" -m pip install -q --no-deps --no-index "$WHEELS"/*.whl; then
            PY="$TMP_ROOT/venv/bin/python"
            log "installed into a venv: $(ls "$WHEELS" | tr '\n' ' ')"
        elif "$PY" -m pip install -q --no-deps --no-index --target "$TMP_ROOT/site" "$WHEELS"/*.whl; then
            EXTRA_PATH="$TMP_ROOT/site"
            log "installed into $EXTRA_PATH: $(ls "$WHEELS" | tr '\n' ' ')"
        else
            log "!! install of $WHEELS failed; going on with $PY as it is"
        fi
    else
        log "!! --wheels $WHEELS holds no .whl files; going on with $PY as it is"
    fi
fi
"$PY" -m pip check 2>&1 | head -20 | while read -r line; do log "pip check: $line"; done
"$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)' \
    || log "!! torch does not import"
if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || log "!! nvidia-smi failed"
else
    log "nvidia-smi: not found"
fi

# 2-6. The check itself: it cuts its own steps short at --limit (LIMIT - 30 s) so the table prints;
# `timeout` is the backstop, still inside 8 minutes, should anything hang past that.
LIMIT="${GPU_CHECK_LIMIT:-450}"
PYTHONPATH="$PWD${EXTRA_PATH:+:$EXTRA_PATH}${PYTHONPATH:+:$PYTHONPATH}" timeout -k 10 "$LIMIT" "$PY" benchmarks/gpu_check.py \
    --limit $((LIMIT > 60 ? LIMIT - 30 : LIMIT / 2)) ${ARGS[@]+"${ARGS[@]}"}
rc=$?
[ "$rc" -eq 124 ] && log "!! gpu_check.py stopped after ${LIMIT}s"
exit "$rc"
