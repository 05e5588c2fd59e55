"""Structured outputs: what a JSON schema on half the batch costs in throughput.

One batch of B chat prompts, every request generating exactly N tokens (greedy), run as:

* unconstrained: no constraints (ignore_eos, so every row makes N tokens);
* half_<schema>_inline: the same, but every other request carries a JSON schema whose output cannot
  finish inside N tokens (an array of at least 64 objects: a string, a bounded int and an enum),
  so the token counts match exactly; the step's masks are filled in the engine's thread after the
  forward pass is launched (on a GPU this overlaps the forward pass in flight);
* half_<schema>_worker: the same with the masks filled on the worker thread, started before the
  forward pass (the overlap the CPU path needs, since its forward pass holds the engine thread).

Schemas: "json" (unbounded string: masks cost microseconds a row) and "json_maxlen" (maxLength 16
on the string, which xgrammar 0.2.8 masks slowly: up to ~5 ms a row inside the string).

Runs are interleaved over the repeats (ABC ABC ...) and the median wall time of each is reported,
so a noisy machine hurts all of them alike. Also reported, per step: the engine's time in each
phase (schedule, launching the forward pass, applying masks, launching the sampling, waiting for the
sampled tokens (readback), the rest = accepting tokens and bookkeeping), the time spent filling masks
(on the worker when overlapped) and how long the engine waited for the worker.

    python benchmarks/structured.py                      # CPU, the default model, B=32, N=64
    python benchmarks/structured.py --device cuda --dummy-shape llama-3.1-8b

Writes benchmarks/results/structured_<cpu|cuda[_shape]>.json.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import write_results  # noqa: E402


def _schema(max_length=None):
    name = {"type": "string"} if max_length is None else {"type": "string", "maxLength": max_length}
    return {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "minItems": 64,
                "items": {
                    "type": "object",
                    "properties": {
                        "name": name,
                        "qty": {"type": "integer", "minimum": 0, "maximum": 999},
                        "tag": {"enum": ["new", "used", "refurbished"]},
                    },
                    "required": ["name", "qty", "tag"],
                },
            }
        },
        "required": ["items"],
    }


# "json": strings unbounded (cheap masks, microseconds a row); "json_maxlen": the same with
# maxLength 16 on the string, which xgrammar 0.2.8 masks slowly (up to ~5 ms a row inside it).
SCHEMAS = {"json": _schema(), "json_maxlen": _schema(16)}
SCHEMA = SCHEMAS["json_maxlen"]

TOPICS = ["groceries", "a bookshop", "a hardware store", "a bakery", "a garden centre", "a toy shop",
          "a pharmacy", "a music store"]


def make_llm(args):
    from forge import LLM

    kw = dict(device=args.device, max_model_len=2048, max_num_seqs=max(64, args.batch))
    if args.device == "cpu":
        kw["num_kv_blocks"] = 1024
    if args.dummy_shape:
        from benchmarks.common import dummy_model_dir

        return LLM(str(dummy_model_dir(args.dummy_shape)), load_format="dummy", **kw)
    return LLM(args.model, **kw)


class PhaseTimer:
    """Wall time of each engine step phase, by wrapping the engine's own calls (5 wrappers a step)."""

    # sample = launching the sampling; readback = waiting for the sampled tokens (the GPU's work)
    PHASES = ("step", "schedule", "execute", "masks", "sample", "readback")

    def __init__(self, engine):
        from forge.engine.sampler import PendingSample
        from forge.structured import StepMasks

        self.total = dict.fromkeys(self.PHASES, 0.0)
        engine.step = self._wrap(engine.step, "step")
        engine.scheduler.schedule = self._wrap(engine.scheduler.schedule, "schedule")
        engine.runner.execute = self._wrap(engine.runner.execute, "execute")
        engine.sampler.sample_async = self._wrap(engine.sampler.sample_async, "sample")
        timed_apply = self._wrap(StepMasks.apply, "masks")
        StepMasks.apply = lambda masks, logits: timed_apply(masks, logits)
        timed_results = self._wrap(PendingSample.results, "readback")
        PendingSample.results = lambda pending: timed_results(pending)

    def _wrap(self, fn, phase):
        total = self.total

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                total[phase] += time.perf_counter() - t0

        return timed

    def snapshot(self):
        return dict(self.total)


def run_once(llm, prompts, params, phases=None):
    engine = llm.llm_engine
    steps0 = engine.stats["steps"]
    backend = engine.structured_backend if engine.has_structured_backend else None
    before = dict(backend.stats) if backend is not None else {}
    phases_before = phases.snapshot() if phases is not None else {}
    if engine.config.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    if engine.config.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    steps = engine.stats["steps"] - steps0
    after = backend.stats if backend is not None else {}
    delta = {k: after[k] - before.get(k, 0) for k in after}
    if phases is not None:
        delta.update({f"phase_{k}": v - phases_before[k] for k, v in phases.snapshot().items()})
    return outs, seconds, steps, delta


def fill_microbench(backend, tokenizer, rows=16, reps=20):
    """Mask-fill cost in the schema's most expensive state (inside a maxLength string), one by one vs
    xgrammar's batched filler, and whether a fill lets other Python threads run (GIL released)."""
    import threading

    import xgrammar as xgr

    from forge import StructuredOutputsParams

    matchers = [backend.matcher(StructuredOutputsParams(json=SCHEMA)) for _ in range(rows)]
    prefix = tokenizer.encode('{"items": [{"name": "Widget')
    for m in matchers:
        for t in prefix:
            assert m.accept(t)
    bm = torch.zeros((rows, backend.bitmask_width), dtype=torch.int32)
    handles = [m.xgr_matcher for m in matchers]

    def serial():
        for i, h in enumerate(handles):
            h.fill_next_token_bitmask(bm, i)

    filler = xgr.BatchGrammarMatcher("auto")

    def batched():
        filler.batch_fill_next_token_bitmask(handles, bm, list(range(rows)))

    def timed(fn):
        fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps

    def py_work(n=200_000):
        x = 0
        for i in range(n):
            x += i
        return x

    t_serial, t_batch = timed(serial), timed(batched)
    t_py = timed(py_work)
    stop = threading.Event()

    def background():
        while not stop.is_set():
            batched()

    th = threading.Thread(target=background)
    th.start()
    t_py_contended = timed(py_work)
    stop.set()
    th.join()
    return {"rows": rows, "state": "inside a maxLength-16 string",
            "serial_fill_ms": round(1000 * t_serial, 3), "batched_fill_ms": round(1000 * t_batch, 3),
            "python_loop_ms": round(1000 * t_py, 3),
            "python_loop_while_batch_fill_runs_ms": round(1000 * t_py_contended, 3)}


def apply_microbench(vocab, batch=32, rows=16, reps=200):
    """The bitmask apply on the GPU: forge's kernel (token_bitmask.cu) vs xgrammar's Triton kernel,
    half the rows of a [batch, vocab] float32 logits tensor: host time per call (what the engine
    thread pays) and device time per call (CUDA events around `reps` back-to-back calls)."""
    import xgrammar as xgr

    from forge.kernels.token_bitmask import apply_token_bitmask

    words = xgr.get_bitmask_shape(1, vocab)[1]
    g = torch.Generator().manual_seed(0)
    full = torch.randint(-(2**31), 2**31 - 1, (batch, words), generator=g, dtype=torch.int64).to(torch.int32).cuda()
    idx = list(range(0, batch, batch // rows))[:rows]
    compact = full[idx].contiguous()
    rows_dev = torch.tensor(idx, dtype=torch.int32, device="cuda")
    logits = torch.randn(batch, vocab, device="cuda")
    ref = logits.clone()
    calls = {
        "forge_kernel": lambda: apply_token_bitmask(logits, compact, rows_dev),
        "xgrammar_triton": lambda: xgr.apply_token_bitmask_inplace(logits, full, vocab_size=vocab, indices=idx,
                                                                   backend="triton"),
    }
    out = {"vocab": vocab, "batch": batch, "masked_rows": rows}
    for name, fn in calls.items():
        try:
            fn()
        except Exception as e:  # e.g. Triton missing
            out[name] = f"failed: {type(e).__name__}: {e}"[:200]
            continue
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        host_us = (time.perf_counter() - t0) / reps * 1e6
        torch.cuda.synchronize()
        out[name] = {"host_us_per_call": round(host_us, 2), "device_us_per_call": round(start.elapsed_time(end) / reps * 1e3, 2)}
    check = ref.clone()
    apply_token_bitmask(check, compact, rows_dev)
    xgr_out = ref.clone()
    xgr.apply_token_bitmask_inplace(xgr_out, full, vocab_size=vocab, indices=idx, backend="triton")
    out["same_result"] = bool(torch.equal(check, xgr_out))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--dummy-shape", default=None, help="random weights of this shape (benchmarks/common.py)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=None, help="tokens per request (default 64 CPU, 256 GPU)")
    ap.add_argument("--repeats", type=int, default=None, help="runs of each mode (default 3 on CPU, 5 on GPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--schemas", nargs="+", default=list(SCHEMAS), choices=list(SCHEMAS))
    ap.add_argument("--out-name", default=None, help="results file name (default structured_<cpu|cuda>)")
    ap.add_argument("--profile", nargs="*", default=[], help="also run these modes once under cProfile (top functions)")
    ap.add_argument("--fill-threads", nargs="*", type=int, default=[],
                    help="extra inline modes with a fixed number of xgrammar filler threads "
                         "(default: one thread, half the cores once a fill is slow)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n_tok = args.max_tokens or (64 if args.device == "cpu" else 256)
    args.repeats = args.repeats or (3 if args.device == "cpu" else 5)

    import xgrammar as xgr

    from forge import SamplingParams, StructuredOutputsParams
    from forge.structured import get_backend

    llm = make_llm(args)
    tok = llm.get_tokenizer()
    prompts = []
    for i in range(args.batch):
        msg = f"List the stock of {TOPICS[i % len(TOPICS)]} (store #{i}) as JSON."
        text = tok.apply_chat_template([{"role": "user", "content": msg}], add_generation_prompt=True)
        prompts.append({"prompt_token_ids": tok.encode(text), "prompt": None})
    plain = SamplingParams(temperature=0, max_tokens=n_tok, ignore_eos=True)
    def half(schema):
        c = SamplingParams(temperature=0, max_tokens=n_tok, ignore_eos=True,
                           structured_outputs=StructuredOutputsParams(json=SCHEMAS[schema]))
        return [c if i % 2 == 0 else plain for i in range(args.batch)]
    backend = get_backend(llm.llm_engine)
    default_overlap = backend.overlap
    micro = fill_microbench(backend, tok)
    apply_micro = apply_microbench(llm.llm_engine.model_config.vocab_size) if args.device != "cpu" else None
    if apply_micro:
        print("bitmask apply micro-benchmark:", apply_micro, flush=True)
    print("mask fill micro-benchmark:", micro, flush=True)

    # mode -> (params, overlap, xgrammar filler threads or None for the default)
    modes = {"unconstrained": ([plain] * args.batch, default_overlap, None)}
    for schema in args.schemas:
        modes[f"half_{schema}_inline"] = (half(schema), False, None)
        modes[f"half_{schema}_worker"] = (half(schema), True, None)
    for n in args.fill_threads:
        modes[f"half_{args.schemas[0]}_inline_{n}threads"] = (half(args.schemas[0]), False, n)

    def set_mode(mode):
        params, backend.overlap, threads = modes[mode]
        # A fixed thread count: the same filler for every fill (default: forge's adaptive choice).
        backend._serial_filler = xgr.BatchGrammarMatcher(threads or 1)
        backend._parallel_filler = xgr.BatchGrammarMatcher(threads) if threads else None
        backend._parallel_fills_left = 10**9 if threads else 0
        return params

    phases = PhaseTimer(llm.llm_engine)
    # Warm-up: compiles the grammar and the kernels, captures CUDA graphs, and runs every mode once
    # at full size (on the GPU the first full runs were measured ~20% slower than later ones).
    for mode in modes:
        params = set_mode(mode)
        run_once(llm, prompts[: min(4, args.batch)], params[: min(4, args.batch)])
        if args.device != "cpu":
            run_once(llm, prompts, params)
    times = {m: [] for m in modes}
    stats = {m: [] for m in modes}
    for r in range(args.repeats):
        order = list(modes)[r % len(modes):] + list(modes)[: r % len(modes)]
        for mode in order:
            params = set_mode(mode)
            outs, seconds, steps, delta = run_once(llm, prompts, params, phases)
            lens = [len(o.outputs[0].token_ids) for o in outs]
            assert all(n == n_tok for n in lens), f"{mode}: output lengths {sorted(set(lens))}, expected {n_tok}"
            times[mode].append(seconds)
            stats[mode].append((steps, delta))
            print(f"  repeat {r} {mode:22s} {seconds:7.2f} s  {args.batch * n_tok / seconds:8.1f} tok/s", flush=True)
    for mode in args.profile:
        import cProfile
        import io
        import pstats

        params = set_mode(mode)
        prof = cProfile.Profile()
        prof.enable()
        run_once(llm, prompts, params)
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
        print(f"cProfile of one {mode} run (top 25 by own time):")
        print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[-6000:])
    backend.overlap = default_overlap

    base = statistics.median(times["unconstrained"])
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    results = {}
    for mode in modes:
        med = statistics.median(times[mode])
        steps = sum(s for s, _ in stats[mode])
        keys = ("apply_s", "accept_s", "fill_s", "wait_s", "masked_rows") + tuple(f"phase_{p}" for p in PhaseTimer.PHASES)
        tot = {k: sum(d.get(k, 0) for _, d in stats[mode]) for k in keys}
        ms = {p: 1000 * tot[f"phase_{p}"] / steps if steps else 0 for p in PhaseTimer.PHASES}
        ms["rest"] = ms["step"] - sum(ms[p] for p in PhaseTimer.PHASES[1:])
        results[mode] = {
            "seconds_median": round(med, 3),
            "seconds_all": [round(t, 3) for t in times[mode]],
            "output_tok_s": round(args.batch * n_tok / med, 1),
            "slowdown_pct_vs_unconstrained": round(100 * (med / base - 1), 2),
            # the same from each repeat's own pair (mode / unconstrained in that repeat): less noisy
            "slowdown_pct_paired_median": round(100 * (statistics.median(
                t / u for t, u in zip(times[mode], times["unconstrained"])) - 1), 2),
            "steps_per_run": steps // args.repeats,
            "apply_masks_ms_per_step": round(1000 * tot["apply_s"] / steps, 3) if steps else 0,
            "grammar_accept_ms_per_step": round(1000 * tot["accept_s"] / steps, 3) if steps else 0,
            "mask_fill_ms_per_step": round(1000 * tot["fill_s"] / steps, 3) if steps else 0,
            "wait_for_prefetch_ms_per_step": round(1000 * tot["wait_s"] / steps, 3) if steps else 0,
            "masked_rows_per_step": round(tot["masked_rows"] / steps, 2) if steps else 0,
            "step_phases_ms": {p: round(v, 3) for p, v in ms.items()},
        }
    payload = {
        "device": device,
        "model": args.dummy_shape and f"dummy:{args.dummy_shape}" or (args.model or "SmolLM2-135M-Instruct Q4_1 (default)"),
        "batch": args.batch, "constrained_rows": (args.batch + 1) // 2,
        "tokens_per_request": n_tok, "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(), "overlap_default_here": default_overlap,
        "schemas": {k: SCHEMAS[k] for k in args.schemas}, "results": results, "fill_microbench": micro,
        "apply_microbench": apply_micro,
    }
    default_name = "structured_cpu" if args.device == "cpu" else "structured_cuda"
    if args.dummy_shape and args.device != "cpu":
        default_name += "_" + args.dummy_shape.split("-")[-1].replace(".", "_")  # structured_cuda_135m / _8b
    path = write_results(args.out_name or default_name, payload)
    print(f"structured outputs on {device}: batch {args.batch} ({payload['constrained_rows']} with a JSON schema), "
          f"{n_tok} tokens each")
    for mode, r in results.items():
        print(f"  {mode:22s} {r['output_tok_s']:8.1f} tok/s  ({r['slowdown_pct_vs_unconstrained']:+.1f}%, "
              f"paired {r['slowdown_pct_paired_median']:+.1f}%)  "
              f"apply {r['apply_masks_ms_per_step']:.2f} ms/step, accept {r['grammar_accept_ms_per_step']:.2f} + "
              f"fill {r['mask_fill_ms_per_step']:.2f} ms/step, "
              f"waited {r['wait_for_prefetch_ms_per_step']:.2f} ms/step")
        print("      step phases ms: " + ", ".join(f"{p} {v:.3f}" for p, v in r["step_phases_ms"].items()))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
