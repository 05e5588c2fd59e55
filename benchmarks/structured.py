"""Structured outputs: what a JSON schema on half the batch costs in throughput.

One batch of B chat prompts, every request generating exactly N tokens (greedy), run as:

* unconstrained: no constraints (ignore_eos, so every row makes N tokens);
* half_<schema>: the same, but every other request carries a JSON schema whose output cannot finish
  inside N tokens (an array of at least 64 objects: a string, a bounded int and an enum), so the
  token counts match exactly; each matcher's next mask is computed on a background thread right
  after it accepts a token (overlapping the next step's scheduling and forward pass);
* half_<schema>_sync: the same with the overlap off (masks filled at sampling time, in the engine's
  thread, by xgrammar's batched filler; on a GPU this still overlaps the forward pass in flight).

Schemas: "json" (unbounded string: masks cost microseconds a row) and "json_maxlen" (maxLength 16
on the string, which xgrammar 0.2.8 masks slowly: up to ~5 ms a row inside the string).

Runs are interleaved over the repeats (ABC ABC ...) and the median wall time of each is reported,
so a noisy machine hurts all of them alike. Also reported: per step, the time the engine spent in
`apply_masks` (critical path), the time spent filling masks (background when overlapped) and how
long the engine waited for a background fill.

    python benchmarks/structured.py                      # CPU, the default model, B=32, N=64
    python benchmarks/structured.py --device cuda --dummy-shape smollm2-135m --max-tokens 256

Writes benchmarks/results/structured_<cpu|cuda>.json.
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


def run_once(llm, prompts, params):
    engine = llm.llm_engine
    steps0 = engine.stats["steps"]
    backend = engine.__dict__.get("_structured_backend")
    before = dict(backend.stats) if backend is not None else {}
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
    for m in matchers:
        m._wait()
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--dummy-shape", default=None, help="random weights of this shape (benchmarks/common.py)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=None, help="tokens per request (default 64 CPU, 256 GPU)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--schemas", nargs="+", default=list(SCHEMAS), choices=list(SCHEMAS))
    ap.add_argument("--out-name", default=None, help="results file name (default structured_<cpu|cuda>)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n_tok = args.max_tokens or (64 if args.device == "cpu" else 256)

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
    print("mask fill micro-benchmark:", micro, flush=True)

    modes = {"unconstrained": ([plain] * args.batch, True)}
    for schema in args.schemas:
        modes[f"half_{schema}"] = (half(schema), True)
        modes[f"half_{schema}_sync"] = (half(schema), False)
    # Warm-up: compiles the grammar, the kernels (Triton on CUDA) and any CUDA graphs.
    for params, overlap in modes.values():
        backend.overlap = overlap
        run_once(llm, prompts[: min(4, args.batch)], params[: min(4, args.batch)])
    times = {m: [] for m in modes}
    stats = {m: [] for m in modes}
    for r in range(args.repeats):
        order = list(modes)[r % len(modes):] + list(modes)[: r % len(modes)]
        for mode in order:
            params, overlap = modes[mode]
            backend.overlap = overlap
            outs, seconds, steps, delta = run_once(llm, prompts, params)
            lens = [len(o.outputs[0].token_ids) for o in outs]
            assert all(n == n_tok for n in lens), f"{mode}: output lengths {sorted(set(lens))}, expected {n_tok}"
            times[mode].append(seconds)
            stats[mode].append((steps, delta))
            print(f"  repeat {r} {mode:22s} {seconds:7.2f} s  {args.batch * n_tok / seconds:8.1f} tok/s", flush=True)
    backend.overlap = default_overlap

    base = statistics.median(times["unconstrained"])
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    results = {}
    for mode in modes:
        med = statistics.median(times[mode])
        steps = sum(s for s, _ in stats[mode])
        tot = {k: sum(d.get(k, 0) for _, d in stats[mode]) for k in ("apply_s", "fill_s", "wait_s", "masked_rows")}
        results[mode] = {
            "seconds_median": round(med, 3),
            "seconds_all": [round(t, 3) for t in times[mode]],
            "output_tok_s": round(args.batch * n_tok / med, 1),
            "slowdown_pct_vs_unconstrained": round(100 * (med / base - 1), 2),
            "steps_per_run": steps // args.repeats,
            "apply_masks_ms_per_step": round(1000 * tot["apply_s"] / steps, 3) if steps else 0,
            "mask_fill_ms_per_step": round(1000 * tot["fill_s"] / steps, 3) if steps else 0,
            "wait_for_prefetch_ms_per_step": round(1000 * tot["wait_s"] / steps, 3) if steps else 0,
            "masked_rows_per_step": round(tot["masked_rows"] / steps, 2) if steps else 0,
        }
    payload = {
        "device": device,
        "model": args.dummy_shape and f"dummy:{args.dummy_shape}" or (args.model or "SmolLM2-135M-Instruct Q4_1 (default)"),
        "batch": args.batch, "constrained_rows": (args.batch + 1) // 2,
        "tokens_per_request": n_tok, "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(), "overlap_default_here": default_overlap,
        "schemas": {k: SCHEMAS[k] for k in args.schemas}, "results": results, "fill_microbench": micro,
    }
    path = write_results(args.out_name or f"structured_{'cuda' if args.device.startswith('cuda') else 'cpu'}", payload)
    print(f"structured outputs on {device}: batch {args.batch} ({payload['constrained_rows']} with a JSON schema), "
          f"{n_tok} tokens each")
    for mode, r in results.items():
        print(f"  {mode:22s} {r['output_tok_s']:8.1f} tok/s  ({r['slowdown_pct_vs_unconstrained']:+.1f}%)  "
              f"apply {r['apply_masks_ms_per_step']:.2f} ms/step, fill {r['mask_fill_ms_per_step']:.2f} ms/step, "
              f"waited {r['wait_for_prefetch_ms_per_step']:.2f} ms/step")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
