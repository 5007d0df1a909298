#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): one GPU, at most 9 minutes, no network. Results under $OUT.
#
# On a machine with JAX (CUDA) and Python 3.12 but no Keras, carry the wheels in .whl/ (README, "GPU check"):
# they are installed into /tmp/site first. KERAS_BACKEND: jax unless set (tensorflow where its CUDA build is
# installed). DEVICE=cpu: the dry run on small sizes (tests/test_gpu_check.py runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
DEVICE=${DEVICE:-gpu}
mkdir -p "$OUT"
export KERAS_BACKEND=${KERAS_BACKEND:-jax}
# This checkout's package and benchmarks, installed or not, for this process and the phases it starts.
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-$(command -v python3)}
# The carried wheels only where Keras is missing (a checkout that holds them still runs the dry run anywhere).
# (Found, not imported: importing Keras and its backend takes seconds of the budget.)
if ! "$PYTHON" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("keras") is None)' &&
        compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{
    echo "date $(date -u +%FT%TZ)"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap \
        --format=csv,noheader || echo "no nvidia-smi"
    "$PYTHON" -c 'import importlib.metadata as m, os, sys; print("python", sys.version.split()[0], "keras",
        m.version("keras"), "backend", os.environ["KERAS_BACKEND"])'
} | tee "$OUT/machine.txt"
exec "$PYTHON" -m benchmarks.gpu_check --device "$DEVICE" --out "$OUT" "$@"
