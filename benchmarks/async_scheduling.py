"""Async scheduling on vs off, same run: decode speed and offline throughput (random weights, bf16).

Async scheduling launches step t+1 before step t's tokens are read back, so the host's per-step
work (scheduling, input staging, detokenization checks) overlaps the GPU. Each configuration
gets its own engine (built one after the other, so only one model is in memory); ratios are
async / sync.

    python benchmarks/async_scheduling.py [--shapes smollm2-135m llama-3.1-8b] [--num-requests 256]

Writes benchmarks/results/async_scheduling.json.
"""

import argparse
import gc
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import dummy_model_dir, run_batches, write_results  # noqa: E402


def engine_for(model_dir, async_scheduling, max_num_seqs, max_model_len, max_num_batched_tokens=2048):
    from forge.config import EngineConfig
    from forge.engine.llm_engine import LLMEngine

    return LLMEngine(EngineConfig(model=str(model_dir), load_format="dummy", device="cuda", dtype="bfloat16",
                                  max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                                  max_num_batched_tokens=max_num_batched_tokens,
                                  async_scheduling=async_scheduling))


def offline(engine, num_requests, seed=0):
    """The throughput.py workload: prompts and outputs of U[100, 1024] tokens, greedy, ignore_eos."""
    import time

    from forge import SamplingParams

    rng = random.Random(seed)
    reqs = [([rng.randrange(32000) for _ in range(rng.randint(100, 1024))],
             SamplingParams(temperature=0, max_tokens=rng.randint(100, 1024), ignore_eos=True))
            for _ in range(num_requests)]
    for warm in (True, False):
        batch = reqs[:8] if warm else reqs
        torch.cuda.synchronize()
        start = time.perf_counter()
        for p, sp in batch:
            engine.add_request({"prompt_token_ids": p}, sp)
        while engine.has_unfinished_requests():
            engine.step(emit="finished")
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    out = sum(sp.max_tokens for _, sp in reqs)
    return {"seconds": round(seconds, 3), "output_tok_s": round(out / seconds, 1),
            "total_tok_s": round((out + sum(len(p) for p, _ in reqs)) / seconds, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["smollm2-135m", "llama-3.1-8b"])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 128])
    ap.add_argument("--num-requests", type=int, default=256, help="offline workload (8B shape only; 0 = skip)")
    args = ap.parse_args()
    rows = []
    for shape in args.shapes:
        model_dir = dummy_model_dir(shape)
        res = {}
        for mode in (False, True):
            engine = engine_for(model_dir, mode, max(args.batch_sizes), 128 + 256 + 16)
            res[mode] = {"decode": run_batches(engine, args.batch_sizes, 128, 256)}
            del engine
            gc.collect()
            torch.cuda.empty_cache()
            if shape == "llama-3.1-8b" and args.num_requests:
                engine = engine_for(model_dir, mode, 256, 4096, 8192)  # as in throughput.py
                res[mode]["offline"] = offline(engine, args.num_requests)
                del engine
                gc.collect()
                torch.cuda.empty_cache()
        for bs in args.batch_sizes:
            s, a = res[False]["decode"][bs], res[True]["decode"][bs]
            rows.append({"shape": shape, "workload": f"decode batch {bs}", "sync_tok_s": round(s["decode_tok_s"], 1),
                         "async_tok_s": round(a["decode_tok_s"], 1), "ratio": round(a["decode_tok_s"] / s["decode_tok_s"], 3)})
        if "offline" in res[False]:
            s, a = res[False]["offline"], res[True]["offline"]
            rows.append({"shape": shape, "workload": f"offline {args.num_requests} requests (output tok/s)",
                         "sync_tok_s": s["output_tok_s"], "async_tok_s": a["output_tok_s"],
                         "ratio": round(a["output_tok_s"] / s["output_tok_s"], 3)})
    device = torch.cuda.get_device_name()
    write_results("async_scheduling", {"device": device, "prompt_len": 128, "output_len": 256, "rows": rows})
    print(f"async scheduling on {device} (decode: prompt 128, 256 generated; decode tok/s after the first token)")
    print(f"{'shape':14s} {'workload':40s} {'sync':>10s} {'async':>10s} {'ratio':>7s}")
    for r in rows:
        print(f"{r['shape']:14s} {r['workload']:40s} {r['sync_tok_s']:10.1f} {r['async_tok_s']:10.1f} {r['ratio']:7.3f}")


if __name__ == "__main__":
    main()
