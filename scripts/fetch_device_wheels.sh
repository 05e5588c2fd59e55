#!/usr/bin/env bash
# Download (here, where pip can reach an index) the cp312 manylinux wheels that the GPU machine
# lacks, into .whl/ (git-ignored). scripts/device_check.sh installs them there with --no-deps.
# One version of each; keep the total under 40 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
PKGS=(
    gguf xgrammar fastapi starlette uvicorn pydantic pydantic-core annotated-types typing-inspection
    anyio sniffio h11 prometheus-client
    jsonschema jsonschema-specifications referencing rpds-py attrs
    tqdm jinja2 markupsafe
    apache-tvm-ffi opentelemetry-api importlib-metadata annotated-doc  # needs of xgrammar, fastapi
)
for p in "${PKGS[@]}"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$p" || echo "WARNING: no wheel for $p"
done
# keep only the newest version of each distribution
python3 - <<'PY'
import re
from pathlib import Path
seen = {}
for w in sorted(Path(".whl").glob("*.whl")):
    name = re.split(r"-\d", w.name, maxsplit=1)[0].lower().replace("_", "-")
    seen.setdefault(name, []).append(w)
for name, ws in seen.items():
    ws.sort(key=lambda p: p.stat().st_mtime)
    for old in ws[:-1]:
        print("removing older", old.name)
        old.unlink()
PY
du -sh .whl
ls .whl
