"""Offline serving throughput (nano-vllm style) and the prefix cache's effect on time-to-first-token.

Workload 1: 256 requests, prompt and output lengths uniform in [100, 1024], random token ids,
ignore_eos, random weights of the given shape, bf16 on the GPU. Reports output and total tok/s;
HF transformers runs batches of the same requests (left-padded, fixed output length) as the baseline.
Workload 2: 200 requests sharing a 2k-token system prompt (+ 32 own tokens, 16 generated), with the
prefix cache on vs off: mean/p50 time-to-first-token and total time.

    python benchmarks/throughput.py [--shape llama-3.1-8b] [--num-requests 256] [--hf-batch-sizes 16 64]

--formats F [F ...] (bf16, fp8 or int4 weights, each optionally + "+fp8kv" for the FP8 KV cache):
workload 1 only, once per format in the same run (one engine each, dummy weights quantized at load),
output and total tok/s, KV blocks and preemptions per format, and each format's ratio to the first
(bf16 when it comes first); no prefix-cache workload, no HF. Writes
benchmarks/results/throughput_quant.json (throughput.json untouched). --quick: 64 requests instead of
256 (same length distribution), for a tight GPU budget.

    python benchmarks/throughput.py --formats bf16 fp8 fp8+fp8kv [--quick]
"""

import argparse
import gc
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (  # noqa: E402
    dummy_model_dir,
    format_engine_kwargs,
    hf_config_dict,
    offline_requests,
    run_offline,
    write_results,
)


def make_engine(model_dir, prefix_caching=True, max_num_seqs=256, max_num_batched_tokens=8192, **engine_kwargs):
    from forge.config import EngineConfig
    from forge.engine.llm_engine import LLMEngine

    return LLMEngine(EngineConfig(**{**dict(model=str(model_dir), load_format="dummy", device="cuda", dtype="bfloat16",
                                            max_model_len=4096, max_num_seqs=max_num_seqs,
                                            max_num_batched_tokens=max_num_batched_tokens,
                                            enable_prefix_caching=prefix_caching), **engine_kwargs}))


def run_all(engine, requests):
    """requests: [(prompt ids, SamplingParams)]; returns (seconds, {request_id: first-token latency})."""
    start = time.perf_counter()
    ids = [engine.add_request({"prompt_token_ids": p}, sp) for p, sp in requests]
    ttft = {}
    while engine.has_unfinished_requests():
        for out in engine.step(emit="finished"):
            ttft[out.request_id] = out.metrics.first_token_time - out.metrics.arrival_time
    torch.cuda.synchronize()
    return time.perf_counter() - start, [ttft[i] for i in ids]


def throughput(model_dir, num_requests, seed=0, **engine_kwargs):
    """Workload 1 (common.offline_requests, lengths U[100, 1024]) on a fresh engine (engine_kwargs:
    quantization, kv_cache_dtype, ...): output and total tok/s, preemptions, KV blocks, weight GB."""
    reqs = offline_requests(num_requests, 32000, 100, 1024, seed)
    engine = make_engine(model_dir, **engine_kwargs)
    res = {**run_offline(engine, reqs, torch.cuda.synchronize), "preemptions": engine.scheduler.num_preemptions,
           "kv_blocks": engine.runner.num_kv_blocks, "weight_gb": round(engine.runner.model.weight_bytes() / 1e9, 3)}
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return res, reqs


def shared_prefix(model_dir, num_requests=200, prefix_len=2048):
    from forge import SamplingParams

    rng = random.Random(1)
    system = [rng.randrange(32000) for _ in range(prefix_len)]
    reqs = [(system + [rng.randrange(32000) for _ in range(32)], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
            for _ in range(num_requests)]
    res = {}
    for on in (True, False):
        engine = make_engine(model_dir, prefix_caching=on)
        run_all(engine, reqs[:2])  # warm-up (and, with caching on, the prefix enters the cache once)
        seconds, ttft = run_all(engine, reqs)
        res["cache_on" if on else "cache_off"] = {
            "seconds": round(seconds, 2), "ttft_mean_ms": round(1000 * statistics.mean(ttft), 1),
            "ttft_p50_ms": round(1000 * statistics.median(ttft), 1),
            "hit_rate": round(engine.prefix_cache_hit_rate, 3),
        }
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    return res


def hf_throughput(shape, reqs, batch_sizes, max_new_tokens):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = hf_config_dict(shape)
    config = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "torch_dtype")})
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    best = {}
    for bs in batch_sizes:
        batch = [p for p, _ in reqs[:bs]]
        width = max(len(p) for p in batch)
        ids = torch.zeros(bs, width, dtype=torch.long)
        mask = torch.zeros(bs, width, dtype=torch.long)
        for i, p in enumerate(batch):  # left padding
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        ids, mask = ids.cuda(), mask.cuda()
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                           do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        secs = time.perf_counter() - start
        best[bs] = {"output_tok_s": round(bs * max_new_tokens / secs, 1),
                    "total_tok_s": round((bs * max_new_tokens + int(mask.sum())) / secs, 1)}
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return best


def format_comparison(model_dir, formats: list[str], num_requests: int) -> dict:
    """Workload 1 once per format (same requests), with each format's output tok/s ratio to the first."""
    runs = {}
    for name in formats:
        runs[name] = throughput(model_dir, num_requests, **format_engine_kwargs(name))[0]
        print(f"  {name}: {runs[name]['output_tok_s']} output tok/s ({runs[name]['weight_gb']} GB of weights, "
              f"{runs[name]['kv_blocks']} KV blocks, {runs[name]['preemptions']} preemptions)", flush=True)
    base = runs[formats[0]]
    for r in runs.values():
        r["output_ratio_vs_" + formats[0]] = round(r["output_tok_s"] / base["output_tok_s"], 2)
    return runs


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.1-8b")
    ap.add_argument("--num-requests", type=int, help="default 256 (--quick: 64)")
    ap.add_argument("--quick", action="store_true", help="64 requests (a tight GPU budget)")
    ap.add_argument("--formats", nargs="+", metavar="FORMAT",
                    help="compare weight formats / KV caches: bf16, fp8, int4, each optionally +fp8kv "
                         "(e.g. bf16 fp8 fp8+fp8kv) -> results/throughput_quant.json")
    ap.add_argument("--hf-batch-sizes", type=int, nargs="*", default=[16, 64])
    ap.add_argument("--hf-new-tokens", type=int, default=128)
    ap.add_argument("--skip-prefix", action="store_true")
    args = ap.parse_args(argv)
    for name in args.formats or []:
        try:
            format_engine_kwargs(name)
        except ValueError as e:
            ap.error(str(e))
    args.num_requests = args.num_requests or (64 if args.quick else 256)
    return args


def main(argv=None):
    args = parse_args(argv)
    model_dir = dummy_model_dir(args.shape)
    if args.formats:
        device = torch.cuda.get_device_name()
        print(f"offline throughput on {device}, {args.shape}, {args.num_requests} requests, lengths U[100,1024], "
              f"by format:", flush=True)
        runs = format_comparison(model_dir, args.formats, args.num_requests)
        write_results("throughput_quant", {"device": device, "shape": args.shape, "requests": args.num_requests,
                                           "lengths": [100, 1024], "baseline": args.formats[0], "runs": runs})
        key = "output_ratio_vs_" + args.formats[0]
        print(f"{'format':<12}{'output tok/s':>14}{'total tok/s':>13}{'x ' + args.formats[0]:>9}{'weight GB':>11}"
              f"{'KV blocks':>11}{'preempt':>9}")
        for name, r in runs.items():
            print(f"{name:<12}{r['output_tok_s']:>14}{r['total_tok_s']:>13}{r[key]:>9.2f}{r['weight_gb']:>11}"
                  f"{r['kv_blocks']:>11}{r['preemptions']:>9}")
        return
    res, reqs = throughput(model_dir, args.num_requests)
    prefix = {} if args.skip_prefix else shared_prefix(model_dir)
    hf = hf_throughput(args.shape, reqs, args.hf_batch_sizes, args.hf_new_tokens) if args.hf_batch_sizes else {}
    hf_best = max((v["output_tok_s"] for v in hf.values()), default=None)
    device = torch.cuda.get_device_name()
    write_results("throughput", {"device": device, "shape": args.shape, "forge": res, "hf": hf,
                                 "ratio_output_vs_hf_best": round(res["output_tok_s"] / hf_best, 2) if hf_best else None,
                                 "shared_prefix": prefix})
    print(f"offline throughput on {device}, {args.shape}, {args.num_requests} requests, lengths U[100,1024]")
    print(f"  forge: {res['output_tok_s']} output tok/s, {res['total_tok_s']} total tok/s in {res['seconds']} s "
          f"({res['preemptions']} preemptions, {res['kv_blocks']} KV blocks)")
    for bs, v in hf.items():
        print(f"  HF transformers batch {bs} ({args.hf_new_tokens} new tokens): {v['output_tok_s']} output tok/s")
    if hf_best:
        print(f"  forge / best HF output tok/s: {res['output_tok_s'] / hf_best:.1f}x")
    for k, v in prefix.items():
        print(f"  shared 2k prefix, {k}: TTFT mean {v['ttft_mean_ms']} ms, p50 {v['ttft_p50_ms']} ms, "
              f"total {v['seconds']} s, hit rate {v['hit_rate']}")


if __name__ == "__main__":
    main()
