"""Prefill speed on the GPU: one prompt of 1k / 4k / 16k tokens through the 8B shape (random
weights, bf16), as TFLOP/s and model FLOP utilisation against the 777 TFLOP/s bf16 GEMM ceiling
measured on the H100. Writes benchmarks/results/prefill.json.

    python benchmarks/prefill.py [--shape llama-3.1-8b] [--lengths 1024 4096 16384]
"""

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import dummy_model_dir, write_results  # noqa: E402

GEMM_CEILING = 777e12


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.1-8b")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    from forge import SamplingParams
    from forge.config import EngineConfig
    from forge.engine.llm_engine import LLMEngine

    longest = max(args.lengths)
    engine = LLMEngine(EngineConfig(model=str(dummy_model_dir(args.shape)), load_format="dummy", device="cuda",
                                    dtype="bfloat16", max_model_len=longest + 16, max_num_seqs=4,
                                    max_num_batched_tokens=longest, enforce_eager=True, enable_prefix_caching=False))
    c = engine.model_config
    per_token = 2 * c.num_layers * (c.hidden_size * (c.q_size + 2 * c.kv_size) + c.q_size * c.hidden_size
                                    + 3 * c.hidden_size * c.intermediate_size)
    rows = []
    g = torch.Generator().manual_seed(0)
    for n in [args.lengths[0]] + args.lengths:  # the first run warms up
        ids = torch.randint(0, 32000, (n,), generator=g).tolist()
        times = []
        for _ in range(3):
            engine.add_request({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=1))
            torch.cuda.synchronize()
            start = time.perf_counter()
            while engine.has_unfinished_requests():
                engine.step(emit="finished")
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        seconds = sorted(times)[1]
        # GEMMs, plus causal attention (QK^T and PV over half the n x n square per head and layer).
        flops = per_token * n + 2 * c.num_layers * c.num_heads * c.head_dim * n * n
        rows.append({"tokens": n, "seconds": round(seconds, 4), "tflop_s": round(flops / seconds / 1e12, 1),
                     "mfu": round(flops / seconds / GEMM_CEILING, 3)})
    rows = rows[1:]
    device = torch.cuda.get_device_name()
    backend = getattr(engine.runner.ops, "_prefill_backend", {})
    write_results("prefill", {"device": device, "shape": args.shape, "attention_backend": {str(k): v for k, v in backend.items()},
                              "rows": rows})
    print(f"prefill on {device}, {args.shape}, bf16 (MFU vs {GEMM_CEILING / 1e12:.0f} TFLOP/s); backend {backend}")
    print(f"{'tokens':>7}{'ms':>9}{'TFLOP/s':>9}{'MFU':>7}")
    for r in rows:
        print(f"{r['tokens']:>7}{1000 * r['seconds']:>9.1f}{r['tflop_s']:>9}{r['mfu']:>7.0%}")


if __name__ == "__main__":
    main()
