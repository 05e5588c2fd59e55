"""Small-batch decode latency on the GPU (issue 18): µs per step, kernels per step and how long the GPU
sits idle between kernels, for forge's launch/fusion variants and gpt-fast (the peer) in the same run.

Shapes: SmolLM2-135M, Llama-3.2-1B (a published megakernel ran it in 759.8 µs per step on an H200) and
Llama-3.1-8B; random (dummy) bf16 weights, 128-token prompts, 256 generated tokens (ignore_eos), greedy,
CUDA graphs on. Per (shape, variant, batch):
  * decode-only tok/s and µs per decode step (benchmarks.common.run_batches),
  * kernels per step and GPU busy share: one decode step after another under torch.profiler (CUPTI
    sees the kernels inside graph replays); busy = the union of kernel intervals over the span from
    the first kernel's start to the last one's end, so 1 - busy is the GPU's idle time between kernels
    and between steps (host work the GPU waits for shows up here),
  * the weight-read floor (copy bandwidth / weight bytes) and the fraction of it reached.
Variants are environment switches, each run in its own process so one variant's compiled kernels and
graphs cannot leak into another's: base (none), pdl (FORGE_PDL=1: programmatic dependent launch),
fused (FORGE_FUSED_NORM_GEMM=1: residual add + RMSNorm folded into the next GEMM, SiLU·mul into
gate_up's), pdl+fused. The peer: gpt-fast (torch.compile, reduce-overhead) through
`<peer dir>/gpt_fast_bench.py` (copy ../shared/peers into .device/peers and carry it), with the
Llama-3.2-1B shape registered by this script (gpt-fast unmodified; its lm_head is untied).

    python benchmarks/latency.py [--shapes smollm2-135m llama-3.2-1b llama-3.1-8b] [--batch-sizes 1 8]
                                 [--variants base pdl fused pdl+fused] [--peer .device/peers | --no-peer]

Writes benchmarks/results/latency.json.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import SHAPES, dummy_model_dir, run_batches, write_results  # noqa: E402

VARIANTS = {"base": {}, "pdl": {"FORGE_PDL": "1"}, "fused": {"FORGE_FUSED_NORM_GEMM": "1"},
            "pdl+fused": {"FORGE_PDL": "1", "FORGE_FUSED_NORM_GEMM": "1"}}
DEFAULT_SHAPES = ["smollm2-135m", "llama-3.2-1b", "llama-3.1-8b"]
PROMPT_LEN, OUTPUT_LEN = 128, 256
PROFILED_STEPS = 20
# gpt-fast's config for the Llama-3.2-1B shape (its table has none); registered before its script runs
PEER_CONFIGS = {"llama-3.2-1b": dict(block_size=131072, n_layer=16, n_head=32, n_local_heads=8, dim=2048,
                                     intermediate_size=8192, vocab_size=128256, rope_base=500000,
                                     rope_scaling=dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                       original_max_position_embeddings=8192))}


def kernel_timeline(events) -> dict:
    """Kernels per profiled window and the GPU's busy share: union of [start, end) of every kernel over the
    span from the first start to the last end (profiler times in µs)."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events)
    if not spans:
        return {"kernels": 0, "busy": 0.0, "span_us": 0.0}
    busy, cur_start, cur_end = 0.0, spans[0][0], spans[0][1]
    for start, end in spans[1:]:
        if start > cur_end:
            busy += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    busy += cur_end - cur_start
    span = spans[-1][1] - spans[0][0]
    return {"kernels": len(spans), "busy": busy / span if span > 0 else 0.0, "span_us": span}


def profile_steps(engine, batch: int, steps: int) -> dict:
    """Kernels per decode step and the busy share over `steps` decode steps of `batch` sequences."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from forge import SamplingParams

    vocab = engine.model_config.vocab_size
    g = torch.Generator().manual_seed(1)
    params = SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True)
    for _ in range(batch):
        engine.add_request({"prompt_token_ids": torch.randint(0, vocab, (PROMPT_LEN,), generator=g).tolist()}, params)
    while not all(s.num_output_tokens >= 2 for s in engine.scheduler.running):  # past prefill and the first decode
        engine.step(emit="finished")
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step(emit="finished")
        torch.cuda.synchronize()
    while engine.has_unfinished_requests():
        engine.step(emit="finished")
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and not e.name.startswith(("Memcpy", "Memset", "[memory]"))]
    timeline = kernel_timeline(kernels)
    return {"kernels_per_step": round(timeline["kernels"] / steps, 1), "gpu_busy": round(timeline["busy"], 4)}


def child(shape: str, batch_sizes: list[int]) -> dict:
    """One variant (its environment already set) on one shape: {batch: figures}."""
    import torch

    from forge.config import EngineConfig
    from forge.engine.llm_engine import LLMEngine

    model_dir = dummy_model_dir(shape)
    engine = LLMEngine(EngineConfig(model=str(model_dir), load_format="dummy", device="cuda", dtype="bfloat16",
                                    max_model_len=PROMPT_LEN + OUTPUT_LEN + 16, max_num_seqs=max(batch_sizes),
                                    max_num_batched_tokens=2048))
    weight_bytes = engine.runner.model.weight_bytes()
    timed = run_batches(engine, batch_sizes, PROMPT_LEN, OUTPUT_LEN)
    out = {}
    for bs in batch_sizes:
        out[bs] = {"decode_tok_s": round(timed[bs]["decode_tok_s"], 1),
                   "us_per_step": round(1000 * timed[bs]["ms_per_step"], 1), **profile_steps(engine, bs, PROFILED_STEPS)}
    del engine
    torch.cuda.empty_cache()
    return {"weight_bytes": weight_bytes, "batches": out}


def run_variant(shape: str, variant: str, batch_sizes: list[int]) -> dict:
    env = {**os.environ, **VARIANTS[variant]}
    cmd = [sys.executable, __file__, "--child", shape, "--batch-sizes", *map(str, batch_sizes)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_peer(peer_dir: Path, shapes: list[str], batch_sizes: list[int]) -> dict:
    """gpt-fast tok/s per 'shape bsN' (its own median of 3 warm runs of 256 tokens), or {'error': ...}."""
    script = peer_dir / "gpt_fast_bench.py"
    if not script.is_file():
        return {"error": f"{script} not found (copy ../shared/peers there and carry it)"}
    register = (f"import sys, runpy; sys.path.insert(0, {str(peer_dir / 'gpt_fast')!r}); import model; "
                f"model.transformer_configs.update({PEER_CONFIGS!r}); "
                f"sys.argv = [{str(script)!r}]; runpy.run_path({str(script)!r}, run_name='__main__')")
    env = {**os.environ, "MODELS": ",".join(shapes), "BATCHES": ",".join(map(str, batch_sizes))}
    proc = subprocess.run([sys.executable, "-c", register], env=env, capture_output=True, text=True)
    print(proc.stdout, end="", flush=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=DEFAULT_SHAPES)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--peer", type=Path, default=ROOT / ".device" / "peers", help="folder with gpt_fast_bench.py")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.batch_sizes)))
        return

    from benchmarks.decode import measure_copy_bandwidth

    bandwidth = measure_copy_bandwidth()
    rows = []
    for shape in args.shapes:
        for variant in args.variants:
            start = time.perf_counter()
            res = run_variant(shape, variant, args.batch_sizes)
            if "error" in res:
                print(f"{shape} {variant}: FAILED {res['error']}", flush=True)
                rows.append({"shape": shape, "variant": variant, "error": res["error"]})
                continue
            floor_us = 1e6 * res["weight_bytes"] / bandwidth
            for bs, r in res["batches"].items():
                row = {"shape": shape, "variant": variant, "batch": int(bs), **r,
                       "weight_gb": round(res["weight_bytes"] / 1e9, 3), "floor_us": round(floor_us, 1),
                       "of_floor": round(floor_us / r["us_per_step"], 3)}
                rows.append(row)
                print(f"{shape} {variant} bs{bs}: {r['us_per_step']:.1f} µs/step ({r['decode_tok_s']:.0f} tok/s), "
                      f"{r['kernels_per_step']} kernels/step, GPU busy {r['gpu_busy']:.1%}, "
                      f"{row['of_floor']:.0%} of the weight-read floor ({time.perf_counter() - start:.0f} s)", flush=True)
    peer = {} if args.no_peer else run_peer(args.peer, args.shapes, args.batch_sizes)
    for row in rows:
        key = f"{row['shape']} bs{row.get('batch')}"
        if isinstance(peer.get(key), (int, float)):
            row["gpt_fast_tok_s"] = peer[key]
            row["x_gpt_fast"] = round(row["decode_tok_s"] / peer[key], 3)
        base = next((r for r in rows if r["shape"] == row["shape"] and r.get("batch") == row.get("batch")
                     and r["variant"] == "base" and "us_per_step" in r), None)
        if base and "us_per_step" in row:
            row["x_base"] = round(base["us_per_step"] / row["us_per_step"], 3)
    import torch

    path = write_results("latency", {"device": torch.cuda.get_device_name(), "copy_bandwidth": bandwidth,
                                     "prompt_len": PROMPT_LEN, "output_len": OUTPUT_LEN, "peer": peer, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
