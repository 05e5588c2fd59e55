"""CPU generation speed of the default model: forge vs HF transformers, same weights, same run.

Batch 1 and batch 16, 32-token prompts, 64 generated tokens (ignore_eos), float32, greedy.
Writes benchmarks/results/cpu_generate.json.

    python benchmarks/cpu_generate.py [--batch-sizes 1 16] [--output-len 64] [--threads 2]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import write_results  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from forge import LLM, SamplingParams
    from forge.loader.safetensors import save_hf_dir

    llm = LLM(max_model_len=1024, num_kv_blocks=2048)
    loaded_dir = Path(tempfile.mkdtemp(prefix="forge-hf-"))
    # HF transformers gets the very same dequantized weights.
    from forge.loader import load_model

    loaded = load_model(None)
    save_hf_dir(loaded_dir, loaded.config, loaded.weights, loaded.tokenizer)
    del loaded

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(loaded_dir, torch_dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    rows = []
    for bs in args.batch_sizes:
        prompts = torch.randint(100, 40000, (bs, args.prompt_len), generator=g)
        params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
        timings = {}
        for name in ("forge", "hf"):
            best = float("inf")
            for _ in range(2):  # best of two: the first may pay warm-up
                start = time.perf_counter()
                if name == "forge":
                    llm.generate([{"prompt_token_ids": p.tolist()} for p in prompts], params, use_tqdm=False)
                else:
                    with torch.inference_mode():
                        hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=args.output_len,
                                    min_new_tokens=args.output_len, do_sample=False, pad_token_id=0)
                best = min(best, time.perf_counter() - start)
            timings[name] = bs * args.output_len / best
        rows.append({"batch": bs, "forge_tok_s": round(timings["forge"], 1), "hf_tok_s": round(timings["hf"], 1),
                     "ratio": round(timings["forge"] / timings["hf"], 2)})
    write_results("cpu_generate", {"threads": args.threads, "prompt_len": args.prompt_len,
                                   "output_len": args.output_len, "rows": rows})
    print(f"CPU generation, default model fp32, {args.threads} threads, prompt {args.prompt_len}, output {args.output_len}")
    print(f"{'batch':>6}{'forge tok/s':>13}{'HF tok/s':>10}{'ratio':>7}")
    for r in rows:
        print(f"{r['batch']:>6}{r['forge_tok_s']:>13}{r['hf_tok_s']:>10}{r['ratio']:>7}")


if __name__ == "__main__":
    main()
