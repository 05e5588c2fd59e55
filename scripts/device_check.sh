#!/usr/bin/env bash
# Run on the GPU machine, in the repo root:  bash scripts/device_check.sh [benchmark ...]
# Installs carried wheels (.whl/), runs the CUDA test suite, then the named benchmarks
# (default: kernels -> benchmarks/kernels.py), printing a short table last. A benchmark may
# carry arguments in one word: 'structured --device cuda --dummy-shape llama-3.1-8b'.
# Env: PYTEST_ARGS (default "-x"), PYTEST_PATHS (default "tests"), OUT (results folder).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/forge_out}"
mkdir -p "$OUT"
touch /tmp/forge_device_check.start  # results written after this come back in $OUT
export PYTHONUNBUFFERED=1
# Dummy-weight benchmark models take the default model's tokenizer from here (git-ignored; carried).
[ -f .device/tokenizer/tokenizer.json ] && export FORGE_TOKENIZER_DIR="$PWD/.device/tokenizer"
# $OUT brings back at most 8 files: one log, the result JSONs and the decode plot.
exec > >(tee "$OUT/device.log") 2>&1

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "== environment"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
python3 - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name(0),
      "sm", torch.cuda.get_device_capability(0))
try:
    import cuda.core
    print("cuda.core", cuda.core.__version__)
except Exception as e:
    print("cuda.core import failed:", e)
from forge.kernels import compiler
print("NVRTC include path:", compiler.cuda_include_dirs())
PY

rc=0
if [ "${PYTEST_PATHS:-tests}" != "none" ]; then  # PYTEST_PATHS=none: benchmarks only
    echo "== pytest -m cuda"
    # shellcheck disable=SC2086
    python3 -m pytest -m cuda ${PYTEST_PATHS:-tests} -q ${PYTEST_ARGS-"-x"} -p no:cacheprovider
    rc=$?
fi

benches=("$@")
[ ${#benches[@]} -eq 0 ] && benches=(kernels)
for b in "${benches[@]}"; do
    name="${b%% *}"
    [ "$name" = none ] && continue  # 'none': tests only
    echo "== benchmark $b"
    # shellcheck disable=SC2086
    python3 "benchmarks/$name.py" ${b#"$name"}
    find benchmarks/results -name "$name*" -newer /tmp/forge_device_check.start -exec cp {} "$OUT/" \; 2>/dev/null
done
echo "== pytest exit code $rc"
exit "$rc"
