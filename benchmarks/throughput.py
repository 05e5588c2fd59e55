"""Offline serving throughput (nano-vllm style) and the prefix cache's effect on time-to-first-token.

Workload 1: 256 requests, prompt and output lengths uniform in [100, 1024], random token ids,
ignore_eos, random weights of the given shape, bf16 on the GPU. Reports output and total tok/s;
HF transformers runs batches of the same requests (left-padded, fixed output length) as the baseline.
Workload 2: 200 requests sharing a 2k-token system prompt (+ 32 own tokens, 16 generated), with the
prefix cache on vs off: mean/p50 time-to-first-token and total time.

    python benchmarks/throughput.py [--shape llama-3.1-8b] [--num-requests 256] [--hf-batch-sizes 16 64]
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
from benchmarks.common import dummy_model_dir, hf_config_dict, write_results  # noqa: E402


def make_engine(model_dir, prefix_caching=True, max_num_seqs=256, max_num_batched_tokens=8192):
    from forge.config import EngineConfig
    from forge.engine.llm_engine import LLMEngine

    return LLMEngine(EngineConfig(model=str(model_dir), load_format="dummy", device="cuda", dtype="bfloat16",
                                  max_model_len=4096, max_num_seqs=max_num_seqs,
                                  max_num_batched_tokens=max_num_batched_tokens,
                                  enable_prefix_caching=prefix_caching))


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


def throughput(model_dir, num_requests, seed=0):
    from forge import SamplingParams

    rng = random.Random(seed)
    vocab = 32000
    reqs = []
    for _ in range(num_requests):
        p, o = rng.randint(100, 1024), rng.randint(100, 1024)
        reqs.append(([rng.randrange(vocab) for _ in range(p)], SamplingParams(temperature=0, max_tokens=o, ignore_eos=True)))
    engine = make_engine(model_dir)
    run_all(engine, reqs[:8])  # warm-up
    seconds, _ = run_all(engine, reqs)
    out_tokens = sum(sp.max_tokens for _, sp in reqs)
    in_tokens = sum(len(p) for p, _ in reqs)
    res = {"requests": num_requests, "seconds": round(seconds, 2), "output_tok_s": round(out_tokens / seconds, 1),
           "total_tok_s": round((out_tokens + in_tokens) / seconds, 1), "preemptions": engine.scheduler.num_preemptions,
           "kv_blocks": engine.runner.num_kv_blocks}
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.1-8b")
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--hf-batch-sizes", type=int, nargs="*", default=[16, 64])
    ap.add_argument("--hf-new-tokens", type=int, default=128)
    ap.add_argument("--skip-prefix", action="store_true")
    args = ap.parse_args()
    model_dir = dummy_model_dir(args.shape)
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
