"""forge's quantized GEMMs (forge/kernels/quant_gemm.cu; quant_gemm_pipe.cu: path "pipe") vs cuBLAS bf16 and
torch._scaled_mm, Llama-3.1-8B's matrices, M = tokens in the step. CUDA-graph replays of the step's 4 matrices
(qkv, o, gate_up, down) x `--layers` copies (so the weights come from HBM, not L2); µs per layer and the
fraction of the copy bandwidth each format's weight bytes reach. Writes benchmarks/results/quant_gemm.json.

--fused-norm (issue 18): instead, per model shape (SmolLM2-135M, Llama-3.2-1B, Llama-3.1-8B) and M = 1, 2, 4, 8,
the qkv and gate_up steps of a decode layer: add_rms_norm + cuBLAS (+ silu_mul) against forge's one launch
(quant_gemm.rms_norm_linear: the norm in the GEMM's prologue, SiLU x up in its epilogue), and the two GEMMs
alone (cuBLAS vs quant_gemm.linear), µs per step from CUDA-graph replays over enough weight copies that they
come from HBM; for qkv also RoPE + the KV-cache write: add_rms_norm + cuBLAS + qkv_rope_cache (composed_rope),
rms_norm_linear + qkv_rope_cache (norm_linear_rope) and the one launch of quant_gemm.rms_norm_qkv_rope_cache
(fused_rope; "x composed" of these three is against composed_rope). Writes
benchmarks/results/quant_gemm_fused_norm.json; decides FORGE_FUSED_NORM_GEMM per shape.

    python benchmarks/quant_gemm.py [--m 1 8 16 32 64 128] [--configs] [--pipe-configs]
    python benchmarks/quant_gemm.py --fused-norm [--m 1 2 4 8] [--configs]
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import SHAPES as MODEL_SHAPES  # noqa: E402
from benchmarks.common import write_results  # noqa: E402
from benchmarks.decode import measure_copy_bandwidth  # noqa: E402
from benchmarks.moe import time_graph  # noqa: E402
from forge.kernels import activation, norm, quant_gemm, quant_gemm_pipe, rope_cache  # noqa: E402
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


FUSED_SHAPES = ("smollm2-135m", "llama-3.2-1b", "llama-3.1-8b")
HBM_BYTES = 512 * 2**20  # weight copies per timed graph: more than the L2 holds


def rope_paths(cfg: dict, ws: list, hidden, residual, norm_weight, g, configs: bool) -> list:
    """qkv with RoPE and the cache write (a bf16 cache, one slot per token): composed_rope (today's default),
    norm_linear_rope (FORGE_FUSED_NORM_GEMM=1 before the RoPE epilogue) and fused_rope (one launch)."""
    dev, m = hidden.device, hidden.shape[0]
    heads, kv_heads, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    positions = torch.randint(0, 4096, (m,), generator=g, device=dev)
    angles = torch.arange(4096, device=dev)[:, None] / 10000 ** (torch.arange(0, d, 2, device=dev) / d)
    cos_sin = torch.cat([angles.cos(), angles.sin()], dim=-1).float()
    k_cache = torch.zeros(64, 16, kv_heads, d, device=dev, dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    rope = (positions, cos_sin, k_cache, v_cache, torch.arange(m, device=dev) * 7, heads, kv_heads, d)
    eps = 1e-5

    def composed_rope():
        for w in ws:
            x = norm.add_rms_norm(hidden, residual, norm_weight, eps)[0]
            rope_cache.qkv_rope_cache(torch.nn.functional.linear(x, w), *rope)

    def norm_linear_rope():
        for w in ws:
            rope_cache.qkv_rope_cache(quant_gemm.rms_norm_linear(hidden, residual, norm_weight, eps, w)[0], *rope)

    def fused_rope(c=None):
        for w in ws:
            quant_gemm.rms_norm_qkv_rope_cache(hidden, residual, norm_weight, eps, w, *rope, **(c or {}))

    paths = [("composed_rope", composed_rope, None)]
    if not quant_gemm.norm_gemm_fits(hidden, residual, norm_weight, ws[0]):
        return paths
    paths.append(("norm_linear_rope", norm_linear_rope, None))
    if quant_gemm.rope_cache_fits(hidden, residual, norm_weight, ws[0], cos_sin, k_cache, v_cache, heads, kv_heads, d):
        paths.append(("fused_rope", fused_rope, None))
        if configs:
            paths += [("fused_rope", lambda c=dict(warps=wp, unroll=u): fused_rope(c), dict(warps=wp, unroll=u))
                      for wp in (4, 8, 16) for u in (1, 2, 4) if (wp, u) != (8, 2)]
    return paths


def fused_norm(ms: list[int], configs: bool, bandwidth: float) -> None:
    """--fused-norm: the norm + qkv / gate_up step as composed today vs one fused launch, per shape and M."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for shape in FUSED_SHAPES:
        cfg = MODEL_SHAPES[shape]
        h = cfg["hidden_size"]
        steps = {"qkv": ((cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * cfg["head_dim"], None),
                 "gate_up": (2 * cfg["intermediate_size"], "silu")}
        norm_weight = (1 + 0.1 * torch.randn(h, generator=g, device=dev)).bfloat16()
        for step, (n, act) in steps.items():
            copies = max(2, min(64, HBM_BYTES // (n * h * 2)))
            ws = [(torch.randn(n, h, generator=g, device=dev) * h ** -0.5).bfloat16() for _ in range(copies)]
            for m in ms:
                hidden = torch.randn(m, h, generator=g, device=dev).bfloat16()
                residual = torch.randn(m, h, generator=g, device=dev).bfloat16()
                x = norm.rms_norm(hidden, norm_weight, 1e-5)

                def composed():
                    for w in ws:
                        y = torch.nn.functional.linear(norm.add_rms_norm(hidden, residual, norm_weight, 1e-5)[0], w)
                        if act:
                            activation.silu_mul(y)

                def fused(cfg=None):
                    for w in ws:
                        quant_gemm.rms_norm_linear(hidden, residual, norm_weight, 1e-5, w, act, **(cfg or {}))

                paths = [("composed", composed, None),
                         ("cublas_gemm", lambda: [torch.nn.functional.linear(x, w) for w in ws], None),
                         ("forge_gemm", lambda: [quant_gemm.linear(x, w) for w in ws], None)]
                if quant_gemm.norm_gemm_fits(hidden, residual, norm_weight, ws[0], act):
                    paths.append(("fused", fused, None))
                    if configs:
                        paths += [("fused", lambda c=dict(warps=wp, unroll=u): fused(c), dict(warps=wp, unroll=u))
                                  for wp in (4, 8, 16) for u in (2, 4, 8) if (wp, u) != (8, 4)]
                if step == "qkv":
                    paths += rope_paths(cfg, ws, hidden, residual, norm_weight, g, configs)
                base = None
                for path, fn, pcfg in paths:
                    us = time_graph(fn, iters=20) * 1e6 / copies
                    base = us if path in ("composed", "composed_rope") else base
                    frac = n * h * 2 / (us * 1e-6) / bandwidth
                    rows.append({"shape": shape, "step": step, "m": m, "path": path, "config": pcfg,
                                 "us": round(us, 2), "fraction_of_bandwidth": round(frac, 3),
                                 "vs_composed": round(base / us, 2)})
                    print(f"{shape:13s} {step:8s} M={m} {path:12s} {str(pcfg or ''):28s} {us:7.2f} us  "
                          f"{frac:6.1%} of {bandwidth / 1e12:.2f} TB/s  {base / us:5.2f}x composed", flush=True)
    write_results("quant_gemm_fused_norm", {"device": torch.cuda.get_device_name(),
                                            "copy_bandwidth_tb_s": bandwidth / 1e12, "rows": rows})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, nargs="+", default=None)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--configs", action="store_true", help="also sweep the kernel's tile shapes at each M")
    ap.add_argument("--pipe-configs", action="store_true",
                    help="also sweep quant_gemm_pipe's K splits and ring depths at each M")
    ap.add_argument("--fused-norm", action="store_true", help="the norm + GEMM fusion per model shape (issue 18)")
    args = ap.parse_args()
    bandwidth = measure_copy_bandwidth()
    if args.fused_norm:
        fused_norm(args.m or [1, 2, 4, 8], args.configs, bandwidth)
        return
    args.m = args.m or [1, 8, 16, 32, 64, 128, 256]
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
                        elif path == "pipe":
                            quant_gemm_pipe.gemm(xs[k], w, **(cfg or {}))
                        else:
                            quant_gemm.gemm(xs[k], w, **(cfg or {}))
            return time_graph(fn, iters=10) * 1e6 / len(layers)

        entries = [("bf16", "cublas", None), ("fp8", "kernel", None), ("fp8", "scaled_mm", None),
                   ("fp8", "scaled_mm_t", None),
                   ("int4", "kernel", None), ("int4", "dequant", None), ("fp8", "pipe", None), ("int4", "pipe", None)]
        if args.configs:
            for fmt in ("fp8", "int4"):
                for rt in (1, 2):
                    for warps in (4, 8, 16):
                        for unroll in (2, 4, 8):
                            entries.append((fmt, "kernel", dict(rt=rt, warps=warps, unroll=unroll)))
        if args.pipe_configs:
            for fmt in ("fp8", "int4"):
                for splits in (1, 2, 4):
                    for stages in (3, 4, 6):
                        entries.append((fmt, "pipe", dict(splits=splits, stages=stages)))
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
