"""Micro-benchmark of forge's CUDA kernels: achieved bandwidth vs the HBM copy ceiling.

    python benchmarks/kernels.py            # writes benchmarks/results/kernels.json (+ $OUT)

Times are device times of CUDA-graph replays (launch overhead excluded), median of several
replays; when one call's footprint fits in L2, the graph rotates over several input copies so
every call reads from HBM. Bandwidth counts the fewest bytes each kernel must move (each input
read once, each output written once). Decode attention is compared with torch SDPA on K/V
already gathered into contiguous [B, Hkv, ctx, D] tensors (and with gather + SDPA).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from forge.kernels import compiler  # noqa: E402
from forge.kernels.activation import silu_mul  # noqa: E402
from forge.kernels.norm import add_rms_norm, rms_norm  # noqa: E402
from forge.kernels.paged_attention import KERNEL_FILE, choose_num_splits, kernel_config, paged_decode_attention  # noqa: E402
from forge.kernels.rope_cache import qkv_rope_cache  # noqa: E402
from forge.kernels.sampling import sample  # noqa: E402

PEAK = 2.94e12  # B/s, H100 SXM HBM3 copy bandwidth used as the ceiling
L2_FOOTPRINT = 160 << 20  # rotate inputs until a graph touches this many bytes
DEV = "cuda"
results: dict = {"kernels": [], "decode": [], "decode_variants": [], "notes": []}
# decode kernel variants compared at a few batch sizes (kwargs of kernel_config)
DECODE_VARIANTS = [
    dict(num_warps=4, tpt=8, tile=32, stages=2, min_blocks=4),  # default
    dict(num_warps=4, tpt=16, tile=32, stages=2, min_blocks=5),
    dict(num_warps=8, tpt=8, tile=32, stages=2, min_blocks=2),
    dict(num_warps=4, tpt=8, tile=16, stages=4, min_blocks=4),
    dict(num_warps=4, tpt=8, tile=32, stages=2, min_blocks=3),
]


def time_graph(fns, reps: int = 15) -> float:
    """Median device time (us) per call of the callables in `fns`, via one CUDA graph."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(fns))
    del graph
    return statistics.median(times)


def n_sets(nbytes: int, cap: int = 32) -> int:
    return max(1, min(cap, math.ceil(L2_FOOTPRINT / max(nbytes, 1))))


def record(name, shape, nbytes, us, torch_us=None, **extra):
    gbps = nbytes / (us * 1e-6) / 1e9
    row = dict(name=name, shape=shape, bytes=nbytes, us=round(us, 2), gbps=round(gbps, 1),
               frac_of_peak=round(gbps * 1e9 / PEAK, 3), **extra)
    if torch_us is not None:
        row["torch_us"] = round(torch_us, 2)
        row["speedup_vs_torch"] = round(torch_us / us, 2)
    results["kernels"].append(row)
    print(f"  {name:<16} {shape:<34} {us:9.1f} us {gbps:8.0f} GB/s {gbps * 1e9 / PEAK:6.1%}"
          + (f"   torch {torch_us:8.1f} us" if torch_us is not None else ""), flush=True)


def bench_copy():
    n = 1 << 28  # 512 MiB of bf16
    a = torch.empty(n, dtype=torch.bfloat16, device=DEV)
    b = torch.empty_like(a)
    us = time_graph([lambda a=a, b=b: b.copy_(a)])
    gbps = 2 * a.numel() * 2 / (us * 1e-6) / 1e9
    results["copy_gbps"] = round(gbps, 1)
    print(f"  device copy (read+write) {gbps:.0f} GB/s = {gbps * 1e9 / PEAK:.1%} of 2.94 TB/s", flush=True)
    del a, b


def bench_elementwise(dtype=torch.bfloat16):
    elt = torch.empty((), dtype=dtype).element_size()
    for t, inter in [(4096, 14336), (64, 14336)]:
        nbytes = 3 * t * inter * elt
        sets = [torch.randn(t, 2 * inter, device=DEV).to(dtype) for _ in range(n_sets(nbytes))]
        us = time_graph([lambda x=x: silu_mul(x) for x in sets])
        tus = time_graph([lambda x=x: F.silu(x[:, :inter]) * x[:, inter:] for x in sets])
        record("silu_mul", f"T={t} I={inter}", nbytes, us, tus)
        del sets
    for t, hidden in [(4096, 4096), (64, 4096), (4096, 576)]:
        w = torch.randn(hidden, device=DEV).to(dtype)
        nbytes = 2 * t * hidden * elt
        sets = [torch.randn(t, hidden, device=DEV).to(dtype) for _ in range(n_sets(2 * nbytes))]
        res = [torch.randn(t, hidden, device=DEV).to(dtype) for _ in sets]

        def torch_rms(x):
            xf = x.float()
            return (w.float() * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6))).to(dtype)

        us = time_graph([lambda x=x: rms_norm(x, w, 1e-6) for x in sets])
        tus = time_graph([lambda x=x: torch_rms(x) for x in sets])
        record("rms_norm", f"T={t} H={hidden}", nbytes, us, tus)
        us = time_graph([lambda x=x, r=r: add_rms_norm(x, r, w, 1e-6) for x, r in zip(sets, res)])
        tus = time_graph([lambda x=x, r=r: torch_rms(x + r) for x, r in zip(sets, res)])
        record("add_rms_norm", f"T={t} H={hidden}", 2 * nbytes, us, tus)
        del sets, res
    h, hkv, d, bs = 32, 8, 128, 16
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=DEV).float() / d))
    freqs = torch.arange(8192, device=DEV).float()[:, None] * inv[None]
    cs = torch.cat((freqs.cos(), freqs.sin()), -1)
    for t in (4096, 64):
        width = (h + 2 * hkv) * d
        nbytes = 2 * t * width * elt + t * d * 4
        k_cache = torch.zeros(t // bs + 1, bs, hkv, d, dtype=dtype, device=DEV)
        v_cache = torch.zeros_like(k_cache)
        sets = [torch.randn(t, width, device=DEV).to(dtype) for _ in range(n_sets(nbytes))]
        pos = torch.randint(0, 8192, (t,), device=DEV)
        slots = torch.randperm(t, device=DEV)
        us = time_graph([lambda x=x, kc=k_cache, vc=v_cache: qkv_rope_cache(x, pos, cs, kc, vc, slots, h, hkv, d) for x in sets])
        record("qkv_rope_cache", f"T={t} H={h} Hkv={hkv} D={d}", nbytes, us)
        del sets, k_cache, v_cache


def build_decode(b, ctx, h=32, hkv=8, d=128, bs=16, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    nblk = b * ctx // bs
    k_cache = torch.randn(nblk, bs, hkv, d, device=DEV, generator=g).to(dtype)
    v_cache = torch.randn(nblk, bs, hkv, d, device=DEV, generator=g).to(dtype)
    tables = torch.randperm(nblk, device=DEV, generator=g).to(torch.int32).view(b, ctx // bs)
    lens = torch.full((b,), ctx, dtype=torch.int32, device=DEV)
    q = torch.randn(b, h, d, device=DEV, generator=g).to(dtype)
    return q, k_cache, v_cache, tables, lens


def bench_decode(batches=(1, 8, 32, 64, 128), ctx=4096, h=32, hkv=8, d=128, bs=16, dtype=torch.bfloat16):
    elt = torch.empty((), dtype=dtype).element_size()
    scale = d ** -0.5
    for b in batches:
        kv_bytes = 2 * b * ctx * hkv * d * elt
        nbytes = kv_bytes + 2 * b * h * d * elt
        sets = [build_decode(b, ctx, h, hkv, d, bs, dtype, seed=i) for i in range(n_sets(kv_bytes, cap=8))]
        cfg = kernel_config(d, h // hkv, dtype)
        sweep = {}
        cands = [1, 2, 4, 8, 16, 32, 64]
        kern = compiler.get_kernel(KERNEL_FILE, "paged_decode_kernel", dtype,
                                   **cfg, BLOCK_SIZE=bs, FORGE_CACHE_DTYPE=compiler.dtype_code(dtype))
        try:
            per_sm = kern.occupancy.max_active_blocks_per_multiprocessor(cfg["NUM_WARPS"] * 32, 0)
        except Exception:  # noqa: BLE001
            per_sm = 2
        heuristic = choose_num_splits(b, hkv, ctx, per_sm)
        for s in sorted(set(cands) | {heuristic}):
            if s > 1 and ctx // s < 64:
                continue
            sweep[s] = time_graph([
                lambda st=st, s=s: paged_decode_attention(st[0], st[1], st[2], st[3], st[4], scale,
                                                          max_context_len=ctx, num_splits=s)
                for st in sets])
        us = sweep[heuristic]
        best_s = min(sweep, key=sweep.get)
        # SDPA on gathered, contiguous K/V
        gathered = []
        for q, kc, vc, tb, _ in sets[: max(1, len(sets) // 2)]:
            idx = tb.long().flatten()
            kg = kc[idx].view(b, ctx, hkv, d).transpose(1, 2).contiguous()
            vg = vc[idx].view(b, ctx, hkv, d).transpose(1, 2).contiguous()
            gathered.append((q.view(b, h, 1, d), kg, vg, kc, vc, tb))

        def sdpa(qq, kg, vg):
            try:
                return F.scaled_dot_product_attention(qq, kg, vg, scale=scale, enable_gqa=True)
            except (RuntimeError, TypeError):
                g2 = h // hkv
                return F.scaled_dot_product_attention(qq, kg.repeat_interleave(g2, 1), vg.repeat_interleave(g2, 1),
                                                      scale=scale)

        sdpa_us = time_graph([lambda x=x: sdpa(x[0], x[1], x[2]) for x in gathered])

        def gather_sdpa(x):
            idx = x[5].long().flatten()
            kg = x[3][idx].view(b, ctx, hkv, d).transpose(1, 2)
            vg = x[4][idx].view(b, ctx, hkv, d).transpose(1, 2)
            return sdpa(x[0], kg, vg)

        gather_us = time_graph([lambda x=x: gather_sdpa(x) for x in gathered])
        gbps = nbytes / (us * 1e-6) / 1e9
        row = dict(batch=b, ctx=ctx, H=h, Hkv=hkv, D=d, block_size=bs, dtype=str(dtype).replace("torch.", ""),
                   bytes=nbytes, num_splits=heuristic, us=round(us, 2), gbps=round(gbps, 1),
                   frac_of_peak=round(gbps * 1e9 / PEAK, 3), best_splits=best_s, best_us=round(sweep[best_s], 2),
                   best_frac_of_peak=round(nbytes / (sweep[best_s] * 1e-6) / PEAK, 3),
                   split_sweep_us={str(k): round(v, 2) for k, v in sweep.items()},
                   sdpa_us=round(sdpa_us, 2), gather_sdpa_us=round(gather_us, 2),
                   speedup_vs_sdpa=round(sdpa_us / us, 2), speedup_vs_gather_sdpa=round(gather_us / us, 2),
                   ctas_per_sm=per_sm, config=cfg)
        results["decode"].append(row)
        print(f"  decode B={b:<4} ctx={ctx} S={heuristic:<3} {us:9.1f} us {gbps:7.0f} GB/s {gbps * 1e9 / PEAK:6.1%}"
              f" | best S={best_s} {sweep[best_s]:8.1f} us | SDPA {sdpa_us:8.1f} us (x{sdpa_us / us:.2f})"
              f" gather+SDPA {gather_us:8.1f} us (x{gather_us / us:.2f})", flush=True)
        del sets, gathered
        torch.cuda.empty_cache()


def bench_decode_variants(batches=(1, 8, 64), ctx=4096, h=32, hkv=8, d=128, bs=16, dtype=torch.bfloat16):
    elt = torch.empty((), dtype=dtype).element_size()
    scale = d ** -0.5
    for b in batches:
        nbytes = 2 * b * ctx * hkv * d * elt
        sets = [build_decode(b, ctx, h, hkv, d, bs, dtype, seed=i) for i in range(n_sets(nbytes, cap=8))]
        for kw in DECODE_VARIANTS:
            cfg = kernel_config(d, h // hkv, dtype, **kw)
            kern = compiler.get_kernel(KERNEL_FILE, "paged_decode_kernel", dtype, **cfg, BLOCK_SIZE=bs,
                                       FORGE_CACHE_DTYPE=compiler.dtype_code(dtype))
            try:
                regs = kern.attributes.num_regs
                regs = regs() if callable(regs) else regs
                per_sm = kern.occupancy.max_active_blocks_per_multiprocessor(cfg["NUM_WARPS"] * 32, 0)
            except Exception:  # noqa: BLE001
                regs, per_sm = None, None
            heur = choose_num_splits(b, hkv, ctx, per_sm or 2)
            timings = {}
            for s in sorted({1, 2, 4, 8, 16, 32, 64, heur}):
                timings[s] = time_graph([
                    lambda st=st, s=s: paged_decode_attention(st[0], st[1], st[2], st[3], st[4], scale,
                                                              max_context_len=ctx, num_splits=s, config=cfg)
                    for st in sets], reps=7)
            best = min(timings, key=timings.get)
            frac = nbytes / (timings[best] * 1e-6) / PEAK
            results["decode_variants"].append(dict(batch=b, config=cfg, regs=regs, ctas_per_sm=per_sm,
                                                   best_splits=best, us=round(timings[best], 2),
                                                   frac_of_peak=round(frac, 3), heuristic_splits=heur,
                                                   sweep_us={str(k): round(v, 2) for k, v in timings.items()}))
            print(f"  variant B={b:<3} warps={cfg['NUM_WARPS']} tpt={cfg['TPT']:<2} "
                  f"tile={cfg['TILE']:<3} stages={cfg['STAGES']} minb={cfg['MIN_BLOCKS']} regs={regs} "
                  f"ctas/SM={per_sm}: best S={best:<2} {timings[best]:8.1f} us {frac:6.1%}"
                  f" (heuristic S={heur}: {timings.get(heur, float('nan')):8.1f} us)", flush=True)
        del sets
        torch.cuda.empty_cache()


def bench_sampling(b=64, vocab=128256):
    logits = [torch.randn(b, vocab, device=DEV) * 3 for _ in range(n_sets(4 * b * vocab, cap=4))]
    base = dict(top_k=torch.zeros(b, dtype=torch.int32, device=DEV), top_p=torch.ones(b, device=DEV),
                min_p=torch.zeros(b, device=DEV), seeds=torch.arange(b, device=DEV),
                steps=torch.zeros(b, dtype=torch.int64, device=DEV))
    temp = torch.full((b,), 0.8, device=DEV)
    us = time_graph([lambda x=x: sample(x, temp, **base, use_top_k_p=False, use_min_p=False) for x in logits])
    record("sample", f"B={b} V={vocab} plain", 4 * b * vocab, us)
    tp = dict(base, top_p=torch.full((b,), 0.9, device=DEV), top_k=torch.full((b,), 50, dtype=torch.int32, device=DEV))
    us = time_graph([lambda x=x: sample(x, temp, **tp, num_logprobs=5, use_top_k_p=True, use_min_p=False)
                     for x in logits])
    record("sample", f"B={b} V={vocab} top-k/p+lp", 4 * b * vocab, us)


def main():
    torch.manual_seed(0)
    t0 = time.time()
    props = torch.cuda.get_device_properties(0)
    results["device"] = dict(name=props.name, sms=props.multi_processor_count, torch=torch.__version__,
                             cuda=torch.version.cuda)
    try:
        import cuda.core

        results["device"]["cuda_core"] = cuda.core.__version__
    except Exception:  # noqa: BLE001
        pass
    results["peak_gbps"] = PEAK / 1e9
    print(f"== {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}", flush=True)
    bench_copy()
    print("== elementwise kernels (bf16)", flush=True)
    bench_elementwise()
    print("== paged decode attention (bf16, H=32, Hkv=8, D=128, block 16, ctx 4096)", flush=True)
    bench_decode()
    if os.environ.get("FORGE_BENCH_VARIANTS", "1") == "1":
        print("== decode kernel variants", flush=True)
        bench_decode_variants()
    print("== sampling", flush=True)
    bench_sampling()
    results["nvrtc_seconds"] = round(compiler.compile_seconds, 2)
    results["wall_seconds"] = round(time.time() - t0, 1)
    out = Path(__file__).resolve().parent / "results" / "kernels.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "kernels.json").write_text(json.dumps(results, indent=1))
    print("\n== summary: fraction of 2.94 TB/s")
    print(f"{'kernel':<16} {'shape':<34} {'us':>9} {'GB/s':>8} {'frac':>7}")
    for r in results["kernels"]:
        print(f"{r['name']:<16} {r['shape']:<34} {r['us']:9.1f} {r['gbps']:8.0f} {r['frac_of_peak']:7.1%}")
    print(f"{'decode B':<10} {'us':>9} {'frac':>7} {'S':>3} {'SDPA us':>9} {'x SDPA':>7} {'x gath+SDPA':>12}")
    for r in results["decode"]:
        print(f"{r['batch']:<10} {r['us']:9.1f} {r['frac_of_peak']:7.1%} {r['num_splits']:>3} {r['sdpa_us']:9.1f}"
              f" {r['speedup_vs_sdpa']:7.2f} {r['speedup_vs_gather_sdpa']:12.2f}")


if __name__ == "__main__":
    main()
