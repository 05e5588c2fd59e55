"""Compile every forge kernel variant with NVRTC for a given arch, without a GPU.

    python scripts/compile_check.py [sm_90]

Prints registers/spills where the cubin can be inspected (`cuobjdump --dump-resource-usage`
when available). Used to catch compile errors before spending device time.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from forge.kernels import compiler, paged_attention  # noqa: E402

arch = sys.argv[1] if len(sys.argv) > 1 else "sm_90"
codes = compiler.DTYPE_CODES
variants = []
for dt in (torch.float32, torch.bfloat16, torch.float16):
    c = codes[dt]
    vec = 16 // torch.empty((), dtype=dt).element_size()
    for v in sorted({1, vec}):
        variants.append(("activation.cu", dict(FORGE_DTYPE=c, VEC=v)))
        variants.append(("norm.cu", dict(FORGE_DTYPE=c, VEC=v, FORGE_WDTYPE=c)))
    for v in sorted({1, 2, 4, vec}):
        variants.append(("rope_cache.cu", dict(FORGE_DTYPE=c, VEC=v, FORGE_CACHE_DTYPE=c)))
    for d, g in [(64, 3), (128, 4), (96, 2), (256, 8), (128, 8), (64, 1), (32, 4)]:
        try:
            cfg = paged_attention.kernel_config(d, g, dt)
        except ValueError as e:
            print("skip", d, g, dt, e)
            continue
        for bs in (16, 32):
            variants.append((paged_attention.KERNEL_FILE, dict(FORGE_DTYPE=c, FORGE_CACHE_DTYPE=c, BLOCK_SIZE=bs, **cfg)))
variants.append(("sampling.cu", dict()))
variants.append(("token_bitmask.cu", dict()))
# decode-kernel variants swept by the benchmark
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from kernels import DECODE_VARIANTS  # noqa: E402

for kw in DECODE_VARIANTS:
    cfg = paged_attention.kernel_config(128, 4, torch.bfloat16, **kw)
    variants.append((paged_attention.KERNEL_FILE, dict(FORGE_DTYPE=1, FORGE_CACHE_DTYPE=1, BLOCK_SIZE=16, **cfg)))

cuobjdump = shutil.which("cuobjdump")
failed = 0
for file, defines in variants:
    t0 = compiler.compile_seconds
    try:
        obj = compiler.compile_source(file, defines, arch)
    except Exception as e:  # noqa: BLE001
        failed += 1
        print(f"FAIL {file} {defines}: {e}")
        continue
    info = ""
    if cuobjdump:
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(obj.code)
        r = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True)
        os.unlink(f.name)
        info = " | ".join(
            " ".join(x for x in line.split() if x.startswith(("REG:", "STACK:", "LOCAL:")))
            for line in r.stdout.splitlines() if "REG:" in line
        )
    print(f"ok   {compiler.compile_seconds - t0:5.2f}s {file} {defines} {info}")
print(f"{len(variants) - failed}/{len(variants)} compiled, NVRTC {compiler.compile_seconds:.2f} s")
sys.exit(1 if failed else 0)
