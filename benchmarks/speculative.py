"""Speculative decoding: n-gram prompt lookup on the CPU (default model, real weights), and the cost of
a verify step on the GPU.

cpu: input-grounded tasks (repeat, edit or summarise a passage given in the prompt, rewrite code) and
open-ended chat, greedy, up to 192 new tokens, through the chat template. Per task and batch size (1:
four requests one after another; 8: eight at once) it times plain and speculative engines back to
back (each request, or the batch, off then on or on then off, alternating, for --rounds rounds: the
2-core CPU is shared, so ratios of adjacent runs are what to read), checks that both give the same
tokens, and reports the acceptance rate, the mean accepted length (tokens per verify step: accepted
drafts + 1) and tok/s on / off (whole requests: prefill included).

gpu: the time of one step of the model runner at a shape (dummy weights, bf16) for a plain decode
(CUDA graph), and for verifying k = 1..8 drafts per sequence (the verify step runs as decode rows
through the decode graphs; also eager through the varlen prefill path, for comparison), batch 1 and
8, context 512. With benchmarks/results/speculative_cpu.json present it projects the end-to-end
speedup at the CPU run's acceptance (a projection: the GPU never ran those prompts).

    python benchmarks/speculative.py cpu [--batch-sizes 1 8] [--rounds 2] [--k 8]
    python benchmarks/speculative.py gpu [--dummy-shape llama-3.1-8b]
    python benchmarks/speculative.py project   (the projection again, from both results files)
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, write_results  # noqa: E402

PASSAGES = [
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. He trimmed the wick, polished the lens, "
    "and watched the ships pass along the rocky coast. In winter the storms were fierce, but the light never failed.",
    "Maria opened her bakery at five every morning. The first loaves came out of the oven at six, and by seven a "
    "line of neighbours stretched down the street. She knew every customer by name and every order by heart.",
    "The river starts as a spring high in the mountains. It runs through pine forests and narrow valleys, past "
    "three small villages, and finally into a wide lake where fishermen wait for trout in the early light.",
    "Our team meets every Monday to plan the week. We review the open tickets, agree on priorities, and assign each "
    "task to one person. On Friday we check what was finished and write down what we learned.",
    "The old library has twelve rooms and more than forty thousand books. Its reading room has tall windows that "
    "face the park, and on sunny afternoons students fill every seat at the long oak tables.",
    "To plant tomatoes, choose a sunny spot and dig a hole twice as deep as the pot. Set the seedling in the hole, "
    "fill it with soil, and water it well. Add a stake so the plant can climb as it grows.",
    "The train left the station at noon and crossed the plains for six hours. Passengers read, slept, or watched "
    "the wheat fields roll by. At sunset it reached the coast, where the air smelled of salt and rain.",
    "Every spring the school holds a science fair. Students build volcanoes, test bridges made of paper, and grow "
    "plants under coloured lights. Parents walk between the tables and ask the young scientists questions.",
]
CODE = [
    "def total(xs):\n    s = 0\n    for x in xs:\n        s = s + x\n    return s\n",
    "def largest(xs):\n    best = xs[0]\n    for x in xs:\n        if x > best:\n            best = x\n    return best\n",
    "def count_words(text):\n    counts = {}\n    for word in text.split():\n        counts[word] = counts.get(word, 0) + 1\n"
    "    return counts\n",
    "def is_prime(n):\n    if n < 2:\n        return False\n    for d in range(2, n):\n        if n % d == 0:\n"
    "            return False\n    return True\n",
    "def average(xs):\n    total = 0\n    for x in xs:\n        total = total + x\n    return total / len(xs)\n",
    "def reverse(text):\n    out = ''\n    for ch in text:\n        out = ch + out\n    return out\n",
    "def evens(xs):\n    result = []\n    for x in xs:\n        if x % 2 == 0:\n            result.append(x)\n"
    "    return result\n",
    "def factorial(n):\n    result = 1\n    for i in range(1, n + 1):\n        result = result * i\n    return result\n",
]
CHAT = [
    "What are some good habits for staying healthy?", "Tell me a short story about a dragon who loves music.",
    "Why is the sky blue?", "Give me three ideas for a birthday party.", "How do I learn to play the guitar?",
    "What should I pack for a weekend camping trip?", "Explain what a computer does, for a child.",
    "Write a poem about autumn leaves.",
]
TEXTS = [f"{PASSAGES[i]}\n\n{PASSAGES[(i + 3) % len(PASSAGES)]}" for i in range(len(PASSAGES))]  # two paragraphs
TASKS = {
    "repeat": [f"Repeat the following text word for word.\n\n{t}" for t in TEXTS],
    "edit": [f"Rewrite the text below in the past tense where needed and otherwise unchanged.\n\n{t}" for t in TEXTS],
    "summarise": [f"Summarise this text.\n\n{t}" for t in TEXTS],
    "code": [f"Rewrite this Python function with type hints, keeping everything else the same.\n\n{c}" for c in CODE],
    "chat": CHAT,
}
GROUNDED = ("repeat", "edit", "summarise", "code")


def run_once(llm, prompts, batch: int, params) -> tuple[float, list, dict]:
    """(seconds, token ids, spec stats delta) of the prompts: together (batch > 1) or one at a time."""
    engine = llm.llm_engine
    stats = engine.spec_stats
    before = (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens) if stats else (0, 0, 0)
    convs = [[{"role": "user", "content": p}] for p in prompts]
    start = time.perf_counter()
    if batch > 1:
        outs = llm.chat(convs, params, use_tqdm=False)
    else:
        outs = [llm.chat(c, params, use_tqdm=False)[0] for c in convs]
    seconds = time.perf_counter() - start
    after = (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens) if stats else (0, 0, 0)
    delta = dict(zip(("drafts", "draft_tokens", "accepted"), (a - b for a, b in zip(after, before))))
    return seconds, [o.outputs[0].token_ids for o in outs], delta


def cpu(args) -> None:
    from forge import LLM, SamplingParams

    spec_config = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": args.lookup_max,
                   "prompt_lookup_min": args.lookup_min}
    common = dict(max_model_len=2048, max_num_seqs=max(args.batch_sizes))
    engines = {"off": LLM(**common), "on": LLM(**common, speculative_config=spec_config)}
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    for llm in engines.values():  # warm up
        llm.chat([{"role": "user", "content": "Hello"}], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    load_before = os.getloadavg()
    rows = []
    for task, prompts in TASKS.items():
        for batch in args.batch_sizes:
            chosen = prompts[:batch] if batch > 1 else prompts[: args.batch1_requests]
            total = {"off": [0.0, 0], "on": [0.0, 0]}
            spec = {"drafts": 0, "draft_tokens": 0, "accepted": 0}
            same = True
            # batch 1: each request off and on back to back; batch 8: the batch off and on; orders alternate
            units = [[p] for p in chosen] if batch == 1 else [chosen]
            for r in range(args.rounds):
                for u, unit in enumerate(units):
                    order = ("off", "on") if (r + u) % 2 == 0 else ("on", "off")
                    ids = {}
                    for mode in order:
                        seconds, ids[mode], delta = run_once(engines[mode], unit, batch, params)
                        total[mode][0] += seconds
                        total[mode][1] += sum(map(len, ids[mode]))
                        if mode == "on":
                            spec = {k: spec[k] + delta[k] for k in spec}
                    same &= ids["on"] == ids["off"]
            tok_s = {m: total[m][1] / total[m][0] for m in total}
            row = {"task": task, "batch": batch, "requests": len(chosen), "generated_tokens": total["on"][1],
                   "tok_s_off": round(tok_s["off"], 1), "tok_s_on": round(tok_s["on"], 1),
                   "speedup": round(tok_s["on"] / tok_s["off"], 3),
                   "acceptance_rate": round(spec["accepted"] / spec["draft_tokens"], 3) if spec["draft_tokens"] else None,
                   "mean_accepted_length": round(1 + spec["accepted"] / spec["drafts"], 2) if spec["drafts"] else None,
                   "mean_draft_length": round(spec["draft_tokens"] / spec["drafts"], 2) if spec["drafts"] else None,
                   "verify_steps": spec["drafts"], "draft_tokens": spec["draft_tokens"],
                   "accepted_tokens": spec["accepted"], "identical_outputs": same}
            rows.append(row)
            print(json.dumps(row), flush=True)
    load_after = os.getloadavg()
    summary = {}
    for batch in args.batch_sizes:
        for group, tasks in (("input_grounded", GROUNDED), ("open_ended", ("chat",))):
            sel = [r for r in rows if r["batch"] == batch and r["task"] in tasks]
            on = sum(r["generated_tokens"] for r in sel) / sum(r["generated_tokens"] / r["tok_s_on"] for r in sel)
            off = sum(r["generated_tokens"] for r in sel) / sum(r["generated_tokens"] / r["tok_s_off"] for r in sel)
            summary[f"{group}_batch{batch}_speedup"] = round(on / off, 3)
    write_results("speculative_cpu", {
        "model": "SmolLM2-135M-Instruct Q4_1 (default), quantization auto", "device": "cpu",
        "threads": engines["on"].llm_engine.config.threads, "speculative_config": spec_config,
        "max_tokens": args.max_tokens, "rounds": args.rounds, "load_average_before": load_before,
        "load_average_after": load_after, "rows": rows, "summary": summary})
    print(f"load average before {load_before}, after {load_after}")
    print(f"{'task':<10}{'batch':>6}{'accept':>8}{'mean len':>9}{'tok/s off':>11}{'tok/s on':>10}{'x':>7}  same")
    for r in rows:
        print(f"{r['task']:<10}{r['batch']:>6}{r['acceptance_rate'] or 0:>8.2f}{r['mean_accepted_length'] or 0:>9.2f}"
              f"{r['tok_s_off']:>11}{r['tok_s_on']:>10}{r['speedup']:>7.2f}  {r['identical_outputs']}")
    print(json.dumps(summary))


def gpu(args) -> None:
    import torch

    from benchmarks.common import dummy_model_dir
    from forge.config import EngineConfig
    from forge.engine.llm_engine import LLMEngine
    from forge.engine.plan import StepPlan

    ks = list(range(1, 9))
    batches, ctx = [1, 8], 512
    engine = LLMEngine(EngineConfig(model=str(dummy_model_dir(args.dummy_shape)), load_format="dummy", device="cuda",
                                    dtype="bfloat16", max_model_len=2048, max_num_seqs=max(batches),
                                    speculative_config={"method": "ngram", "num_speculative_tokens": max(ks)}))
    runner = engine.runner
    vocab = engine.model_config.vocab_size
    per_seq = -(-(ctx + max(ks) + 2) // runner.block_size)
    tables = [list(range(1 + i * per_seq, 1 + (i + 1) * per_seq)) for i in range(max(batches))]
    g = torch.Generator().manual_seed(0)

    def plan(batch, start, n):
        p = StepPlan()
        for i in range(batch):
            p.add_row(i, f"r{i}", start, torch.randint(0, vocab, (n,), generator=g).tolist(), tables[i], min(n, 1 + max(ks)),
                      min(n, 1 + max(ks)))
        return p

    def step_ms(p, iters=30) -> float:
        for _ in range(3):
            runner.execute(p)
        torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            runner.execute(p)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2] * 1000

    runner.execute(plan(max(batches), 0, ctx))  # the context's K/V
    rows = []
    for batch in batches:
        decode = step_ms(plan(batch, ctx, 1))
        runner.flat_verify = False
        graphs, runner.graphs = runner.graphs, None
        decode_eager = step_ms(plan(batch, ctx, 1))
        eager = {k: step_ms(plan(batch, ctx, 1 + k)) for k in ks}
        runner.graphs, runner.flat_verify = graphs, True
        for k in ks:
            verify = step_ms(plan(batch, ctx, 1 + k))
            rows.append({"batch": batch, "k": k, "decode_ms": round(decode, 3), "verify_ms": round(verify, 3),
                         "verify_over_decode": round(verify / decode, 3), "decode_eager_ms": round(decode_eager, 3),
                         "verify_eager_varlen_ms": round(eager[k], 3),
                         "eager_varlen_over_decode": round(eager[k] / decode, 3)})
            print(json.dumps(rows[-1]), flush=True)
    projection = project(rows)
    write_results("speculative_gpu", {"device": torch.cuda.get_device_name(), "shape": args.dummy_shape,
                                      "context": ctx, "rows": rows, "projection": projection})
    print(f"{'batch':>5}{'k':>3}{'decode ms':>11}{'verify ms':>11}{'x decode':>9}{'eager varlen':>14}")
    for r in rows:
        print(f"{r['batch']:>5}{r['k']:>3}{r['decode_ms']:>11}{r['verify_ms']:>11}{r['verify_over_decode']:>9}"
              f"{r['verify_eager_varlen_ms']:>14}")
    print(json.dumps(projection, indent=1))


def project(rows) -> dict:
    """The end-to-end speedup each CPU task would get at the GPU's measured step costs: the CPU run's
    tokens, verify steps and draft lengths, with each step costed at this shape (a projection)."""
    path = RESULTS / "speculative_cpu.json"
    if not path.exists():
        return {}
    out = {}
    for r in json.loads(path.read_text())["rows"]:
        if not r["verify_steps"]:
            continue
        costs = {x["k"]: x["verify_over_decode"] for x in rows if x["batch"] == r["batch"]}
        if not costs:
            continue
        k = min(costs, key=lambda c: abs(c - r["mean_draft_length"]))
        tokens = r["generated_tokens"]  # the speculative engine's, over all rounds
        verify_tokens = r["verify_steps"] + r["accepted_tokens"]
        plain_steps = max(tokens - verify_tokens, 0)
        out[f"{r['task']}_batch{r['batch']}"] = round(tokens / (plain_steps + r["verify_steps"] * costs[k]), 2)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    c = sub.add_parser("cpu")
    c.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    c.add_argument("--batch1-requests", type=int, default=4, help="requests run one at a time at batch 1")
    c.add_argument("--rounds", type=int, default=2)
    c.add_argument("--max-tokens", type=int, default=192)
    c.add_argument("--k", type=int, default=8, help="num_speculative_tokens")
    c.add_argument("--lookup-max", type=int, default=4)
    c.add_argument("--lookup-min", type=int, default=2)
    g = sub.add_parser("gpu")
    g.add_argument("--dummy-shape", default="llama-3.1-8b")
    sub.add_parser("project", help="redo the GPU projection from the two results files")
    args = ap.parse_args()
    if args.what == "project":
        path = RESULTS / "speculative_gpu.json"
        gpu_results = json.loads(path.read_text())
        gpu_results["projection"] = project(gpu_results["rows"])
        path.write_text(json.dumps(gpu_results, indent=2))
        print(json.dumps(gpu_results["projection"], indent=1))
        return
    cpu(args) if args.what == "cpu" else gpu(args)


if __name__ == "__main__":
    main()
