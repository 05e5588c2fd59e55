"""forge's quantized GEMM (forge/kernels/quant_gemm.cu) vs cuBLAS bf16 and torch._scaled_mm, Llama-3.1-8B's
matrices, M = tokens in the step. CUDA-graph replays of the step's 4 matrices (qkv, o, gate_up, down) x
`--layers` copies (so the weights come from HBM, not L2); µs per layer and the fraction of the copy
bandwidth each format's weight bytes reach. Writes benchmarks/results/quant_gemm.json.

    python benchmarks/quant_gemm.py [--m 1 8 16 32 64 128] [--configs]
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import write_results  # noqa: E402
from benchmarks.decode import measure_copy_bandwidth  # noqa: E402
from benchmarks.moe import time_graph  # noqa: E402
from forge.kernels import quant_gemm  # noqa: E402
from forge.quant.cuda import FP8, FP8_MAX, Fp8CudaWeight, Int4CudaWeight, scaled_mm_rowwise  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def scaled_mm_tensorwise(x: torch.Tensor, codes: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
    """scaled_mm_rowwise's alternative, compared here (slower at every M on the H200): one scale for all
    of x (cuBLASLt's FP8 GEMM, tensor-wise scales), the weight's row scales applied to the output."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).float()
    x_scale = (x2.abs().amax() / FP8_MAX).clamp_(min=1e-12)
    xq = (x2 / x_scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    one = torch.ones((), device=x.device)
    out = torch._scaled_mm(xq, codes.t(), scale_a=x_scale, scale_b=one, out_dtype=x.dtype)
    return (out * row_scale).to(x.dtype).view(*lead, codes.shape[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, nargs="+", default=[1, 8, 16, 32, 64, 128, 256])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--configs", action="store_true", help="also sweep the kernel's tile shapes at each M")
    args = ap.parse_args()
    bandwidth = measure_copy_bandwidth()
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    layers = []
    for _ in range(args.layers):
        layer = {}
        for name, (n, k) in SHAPES.items():
            w = torch.randn(n, k, generator=g, device=dev, dtype=torch.bfloat16) * 0.02
            layer[name] = {"bf16": w, "fp8": Fp8CudaWeight.quantize(w), "int4": Int4CudaWeight.quantize(w, 128)}
        layers.append(layer)
    per_layer_bytes = {fmt: sum(layers[0][name][fmt].nbytes if fmt != "bf16" else layers[0][name][fmt].numel() * 2
                                for name in SHAPES) for fmt in ("bf16", "fp8", "int4")}
    rows = []
    for m in args.m:
        xs = {k: torch.randn(m, k, generator=g, device=dev, dtype=torch.bfloat16) for k in (4096, 14336)}

        def run(fmt, path, cfg=None):
            def fn():
                for layer in layers:
                    for name, (_, k) in SHAPES.items():
                        w = layer[name][fmt]
                        if path == "cublas":
                            torch.nn.functional.linear(xs[k], w)
                        elif path == "scaled_mm":
                            scaled_mm_rowwise(xs[k], w.codes[: w.shape[0]], w._row_scale)
                        elif path == "scaled_mm_t":
                            scaled_mm_tensorwise(xs[k], w.codes[: w.shape[0]], w._row_scale)
                        elif path == "dequant":
                            torch.nn.functional.linear(xs[k], quant_gemm.int4_dequantize(w, torch.bfloat16))
                        else:
                            quant_gemm.gemm(xs[k], w, **(cfg or {}))
            return time_graph(fn, iters=10) * 1e6 / len(layers)

        entries = [("bf16", "cublas", None), ("fp8", "kernel", None), ("fp8", "scaled_mm", None),
                   ("fp8", "scaled_mm_t", None),
                   ("int4", "kernel", None), ("int4", "dequant", None)]
        if args.configs:
            for fmt in ("fp8", "int4"):
                for rt in (1, 2):
                    for warps in (4, 8, 16):
                        for unroll in (2, 4, 8):
                            entries.append((fmt, "kernel", dict(rt=rt, warps=warps, unroll=unroll)))
        base = None
        for fmt, path, cfg in entries:
            try:
                us = run(fmt, path, cfg)
            except Exception as e:  # noqa: BLE001 - a config the kernel refuses
                print(f"M={m} {fmt} {path} {cfg}: {type(e).__name__}: {str(e)[:100]}")
                continue
            base = us if fmt == "bf16" else base
            frac = per_layer_bytes[fmt] / (us * 1e-6) / bandwidth
            rows.append({"m": m, "format": fmt, "path": path, "config": cfg, "us_per_layer": round(us, 2),
                         "fraction_of_bandwidth": round(frac, 3), "vs_bf16": round(base / us, 2)})
            print(f"M={m:4d} {fmt:5s} {path:9s} {str(cfg or ''):45s} {us:8.1f} us/layer  {frac:6.1%} of "
                  f"{bandwidth / 1e12:.2f} TB/s  {base / us:5.2f}x bf16", flush=True)
    write_results("quant_gemm", {"device": torch.cuda.get_device_name(), "copy_bandwidth_tb_s": bandwidth / 1e12,
                                 "per_layer_bytes": per_layer_bytes, "rows": rows})


if __name__ == "__main__":
    main()
