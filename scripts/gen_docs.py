"""Write the option tables of docs/CLI.md, docs/PYTHON_API.md and docs/SERVER.md from the code itself:
the `forge` argparse parser, the dataclass fields (EngineConfig, SamplingParams, outputs) with the
comments written beside them, and the server's request models. The pages keep their hand-written text;
only the parts between `<!-- generated: NAME -->` and `<!-- end generated -->` are rewritten.

    python scripts/gen_docs.py          # rewrite the generated parts
    python scripts/gen_docs.py --check  # exit 1 if a page is out of date (tests/test_docs.py runs this)
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MARKER = re.compile(r"(<!-- generated: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S)

# Fields whose definition carries no comment: what they mean (vLLM's meanings where the name is vLLM's).
DESCRIPTIONS = {
    "device": "cpu, cuda or cuda:N",
    "block_size": "tokens per KV-cache block (a power of two)",
    "gpu_memory_utilization": "fraction of GPU memory forge may use, KV cache included",
    "max_num_seqs": "most sequences decoded together in one step",
    "max_num_batched_tokens": "token budget of one step; longer prompts are prefilled in chunks",
    "enable_prefix_caching": "reuse the KV cache of a prompt prefix seen before",
    "enforce_eager": "CUDA: run decode without CUDA graphs",
    "EngineConfig.seed": "the engine's seed; LLM(seed=...) also seeds requests that have none (as vLLM)",
    "n": "completions generated from each prompt",
    "top_p": "nucleus sampling: keep the smallest set of tokens whose probability reaches top_p",
    "min_p": "drop tokens below min_p x the most likely token's probability",
    "SamplingParams.seed": "the request's seed: the same seed gives the same text",
    "min_tokens": "generate at least this many tokens before EOS or a stop token may end the text",
    "stop": "strings that end the text (not included unless include_stop_str_in_output)",
    "stop_token_ids": "token ids that end the text (included in token_ids)",
    "ignore_eos": "keep generating past the end-of-sequence token",
    "prompt_logprobs": "logprobs of each prompt token plus this many top ones (-1 = the whole vocabulary)",
    "presence_penalty": "OpenAI's: subtract this from the logit of every token already generated",
    "frequency_penalty": "OpenAI's: subtract this x the count of each token already generated",
    "repetition_penalty": "HF's: divide positive / multiply negative logits of tokens seen (prompt included)",
    "skip_special_tokens": "leave special tokens out of the text",
    "include_stop_str_in_output": "keep the stop string at the end of the text",
    "structured_outputs": "a StructuredOutputsParams: constrain the text (JSON schema, regex, choice, grammar)",
    "index": "which of the request's n completions this is",
    "text": "the generated text (a stop string cut off)",
    "token_ids": "the generated token ids",
    "cumulative_logprob": "sum of the chosen tokens' logprobs (with logprobs set)",
    "logprobs": "per generated token, {token id: Logprob} (with SamplingParams.logprobs set)",
    "request_id": "the engine's id of the request",
    "prompt": "the prompt text (for LLM.chat, the rendered chat template)",
    "prompt_token_ids": "the prompt's token ids",
    "outputs": "one CompletionOutput per completion (n)",
    "finished": "every completion has finished",
    "num_cached_tokens": "prompt tokens whose KV cache came from the prefix cache",
    "metrics": "a RequestMetrics: when the request arrived, was scheduled, got its first and last tokens",
    "logprob": "the token's log probability under the model (before sampling filters)",
    "rank": "1 = most likely",
    "decoded_token": "the token's text",
    "json": "a JSON schema (dict or its JSON text)",
    "regex": "a regular expression the whole text matches",
    "choice": "the text is exactly one of these strings",
    "grammar": "an EBNF grammar (GBNF style)",
}

# Request fields of the server (pydantic models) that carry no comment.
REQUEST_DESCRIPTIONS = {
    "model": "the served model's name, or \"default\"; another name is a 404",
    "stream": "send the text as server-sent events as it is generated",
    "stream_options": "`{\"include_usage\": true}`: a last event with the token counts",
    "user": "accepted and ignored (OpenAI's end-user id)",
    "logit_bias": "{token id: bias in [-100, 100]} added to the logits",
    "response_format": "`{\"type\": \"json_object\"}` or `{\"type\": \"json_schema\", \"json_schema\": {...}}`",
    "guided_json": "vLLM's older spelling of structured_outputs.json",
    "guided_regex": "vLLM's older spelling of structured_outputs.regex",
    "guided_choice": "vLLM's older spelling of structured_outputs.choice",
    "guided_grammar": "vLLM's older spelling of structured_outputs.grammar",
    "structured_outputs": "vLLM's: exactly one of json, json_object, regex, choice, grammar",
    "echo": "put the prompt before the completion (with logprobs: the prompt's too)",
    "CompletionRequest.logprobs": "how many top logprobs per token (0 = the chosen one's only)",
    "suffix": "not supported: a request with a suffix is refused (400)",
    "best_of": "only 1 (or n) is accepted",
    "messages": "the conversation, OpenAI's shape (text content parts, tool calls and results)",
    "ChatCompletionRequest.logprobs": "true: the chosen tokens' logprobs",
    "top_logprobs": "with logprobs: this many top tokens per position (0-20)",
    "add_generation_prompt": "vLLM's: end the prompt with the assistant turn's opening (default true)",
    "continue_final_message": "vLLM's: continue the last message instead of starting a turn",
    "chat_template_kwargs": "vLLM's: more variables for the chat template (e.g. enable_thinking)",
    "tools": "OpenAI's function tools, given to the chat template",
    "tool_choice": "none, auto, required, or a named function",
    "parallel_tool_calls": "false: at most one tool call",
}


def field_comments(cls) -> dict[str, str]:
    """{field name: the comment beside it, or else the comment lines right above it} from the class source."""
    comments, above = {}, []
    for line in inspect.getsource(cls).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# "))
            continue
        m = re.match(r"    (\w+)\s*:[^#]*?(?:#\s*(.*))?$", line)
        if m and not stripped.startswith(("def ", "@", "return")):
            comments[m.group(1)] = m.group(2) or " ".join(above)
        above = []
    return comments


def _default(f) -> str:
    if f.default is not dataclasses.MISSING:
        return f"`{f.default!r}`"
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f"`{f.default_factory()!r}`"  # type: ignore[misc]
    return "required"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def dataclass_table(cls, skip: tuple[str, ...] = ()) -> str:
    comments = field_comments(cls)
    rows = ["| name | default | meaning |", "| --- | --- | --- |"]
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        meaning = comments.get(f.name) or DESCRIPTIONS.get(f"{cls.__name__}.{f.name}") or DESCRIPTIONS.get(f.name, "")
        rows.append(f"| `{f.name}` | {_cell(_default(f))} | {_cell(meaning)} |")
    return "\n".join(rows)


def model_fields_table(model) -> str:
    """A pydantic request model's fields (by their JSON names). A field left out takes its model default,
    or for a sampling setting SamplingParams' default (tests/test_docs.py checks that the server does so)."""
    from forge.sampling_params import SamplingParams

    sampling_defaults = {f.name: f.default for f in dataclasses.fields(SamplingParams)}
    sampling_comments = field_comments(SamplingParams)
    comments = {}
    for cls in reversed(model.__mro__):
        if cls.__module__.startswith("forge"):
            comments.update(field_comments(cls))
    rows = ["| field | default | notes |", "| --- | --- | --- |"]
    for name, info in model.model_fields.items():
        shown = info.alias or name
        default = info.default
        if default is None and name in sampling_defaults and name not in ("logprobs", "max_tokens"):
            default = sampling_defaults[name]
        default = "required" if info.is_required() else f"`{default!r}`"
        notes = (comments.get(name) or REQUEST_DESCRIPTIONS.get(f"{model.__name__}.{name}")
                 or REQUEST_DESCRIPTIONS.get(name) or sampling_comments.get(name) or DESCRIPTIONS.get(name, ""))
        rows.append(f"| `{shown}` | {_cell(default)} | {_cell(notes)} |")
    return "\n".join(rows)


def _flag_cell(action: argparse.Action) -> str:
    names = ", ".join(f"`{o}`" for o in action.option_strings) or f"`{action.dest}`"
    if action.nargs == 0:
        return names
    metavar = action.metavar or (f"{{{','.join(map(str, action.choices))}}}" if action.choices else action.dest.upper())
    return f"{names} {metavar}".replace("|", "\\|")


SHARED_GROUPS = ("model and engine", "logging", "sampling")  # the same in several subcommands: listed once


def parser_tables(parser: argparse.ArgumentParser, groups: tuple[str, ...] | None = None) -> str:
    """One table per argument group of a (sub)parser (all but the shared ones, or just `groups`): the flag,
    then its help as `forge ... --help` shows it."""
    out = []
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if not isinstance(a, argparse._HelpAction)]
        if not actions or (group.title in SHARED_GROUPS) != (groups is not None) or \
                (groups is not None and group.title not in groups):
            continue
        title = {"positional arguments": "arguments", "options": "options"}.get(group.title, group.title)
        out += [f"**{title}**", "", "| flag | what it does |", "| --- | --- |"]
        for a in actions:
            help_text = (a.help or "") % {"default": a.default} if a.help else ""
            out.append(f"| {_flag_cell(a)} | {_cell(help_text)} |")
        out.append("")
    return "\n".join(out).rstrip()


def subparsers() -> dict[str, argparse.ArgumentParser]:
    from forge.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def not_applicable_table() -> str:
    from forge.llm import _NOT_APPLICABLE

    rows = ["| argument | vLLM's default | why it does not apply |", "| --- | --- | --- |"]
    rows += [f"| `{name}` | `{default!r}` | {_cell(reason)} |" for name, (default, reason) in _NOT_APPLICABLE.items()]
    return "\n".join(rows)


def signature(func, name: str) -> str:
    return f"```python\n{name}{inspect.signature(func)}\n```".replace("'", '"')


def metrics_table() -> str:
    from forge.server.metrics import ServerMetrics

    rows = ["| metric | type | what it counts |", "| --- | --- | --- |"]
    for metric in ServerMetrics().registry.collect():
        rows.append(f"| `{metric.name}` | {metric.type} | {_cell(metric.documentation)} |")
    return "\n".join(rows)


def sections() -> dict[str, str]:
    from forge.config import EngineConfig
    from forge.llm import LLM
    from forge.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
    from forge.sampling_params import SamplingParams, StructuredOutputsParams
    from forge.server import protocol

    subs = subparsers()
    from forge.cli import CHAT_HELP

    found = {
        **{f"cli-{name}": parser_tables(p) for name, p in subs.items()},
        **{f"cli-{group.replace(' ', '-')}": parser_tables(subs["generate"], (group,)) for group in SHARED_GROUPS},
        "cli-chat-commands": f"```\n{CHAT_HELP}\n```",
        "env-vars": env_table(),
        "engine-config": dataclass_table(EngineConfig, skip=("model",)),
        "vllm-not-applicable": not_applicable_table(),
        "llm-methods": "\n\n".join([signature(LLM.__init__, "LLM.__init__"), signature(LLM.generate, "LLM.generate"),
                                    signature(LLM.chat, "LLM.chat"), signature(LLM.get_tokenizer, "LLM.get_tokenizer")]),
        "sampling-params": dataclass_table(SamplingParams),
        "structured-outputs": dataclass_table(StructuredOutputsParams),
        "request-output": dataclass_table(RequestOutput),
        "completion-output": dataclass_table(CompletionOutput),
        "logprob": dataclass_table(Logprob),
        "request-metrics": dataclass_table(RequestMetrics),
        "completion-request": model_fields_table(protocol.CompletionRequest),
        "chat-request": model_fields_table(protocol.ChatCompletionRequest),
        "server-metrics": metrics_table(),
    }
    return found


PAGES = ("docs/CLI.md", "docs/PYTHON_API.md", "docs/SERVER.md", "README.md")

# Every environment variable forge reads, and what it does. gen_docs fails on a FORGE_* name in the
# source that is missing here, so a new one cannot go undocumented.
ENV_VARS = {
    "FORGE_API_KEY": "`forge serve`: the API key when `--api-key` is not given (`ps` does not show it)",
    "FORGE_TP_TIMEOUT_S": "tensor parallelism: seconds a rank waits for the others (start-up, each collective) "
                          "before giving up (default 600)",
    "FORGE_STRUCTURED_FILL_THREADS": "structured outputs: threads of xgrammar's pool for slow mask fills "
                                     "(default: half the hardware threads)",
    "FORGE_STRUCTURED_OVERLAP": "structured outputs: 1/0 forces filling grammar masks on a worker thread while the "
                                "forward pass runs on or off (default: on for the CPU when a core is spare)",
    "FORGE_NATIVE": "CPU: 0 turns forge's own C++ kernels (forge/native: the quantized matmul and the per-layer "
                    "ops) off, so torch's kernels run instead (default: on where the CPU has AVX-512 VNNI and a "
                    "C++ compiler is found)",
    "FORGE_CACHE_DIR": "CPU: where the native kernels' build is cached (default: `$XDG_CACHE_HOME/forge`, else "
                       "`~/.cache/forge`)",
    "CXX": "CPU: the C++ compiler that builds forge's native kernels (default: c++, g++, then clang++)",
    "FORGE_CUDA_INCLUDE": "CUDA: a folder with cuda_bf16.h / cuda_fp16.h for NVRTC, tried first",
    "FORGE_FUSED_NORM_GEMM": "CUDA: 1 computes each decoder layer's residual add + RMSNorm inside the GEMM that "
                             "reads it (qkv, gate_up; and SiLU / GELU x up in gate_up's, RoPE and the KV-cache "
                             "write in qkv's) as one forge kernel at steps of <= 8 tokens: 4 fewer kernels per "
                             "layer (unmeasured, issue 18). Default 0",
    "FORGE_PDL": "CUDA: 1 launches forge's own kernels with programmatic dependent launch (each may start while "
                 "the previous kernel finishes; sm_90+, off with a log line elsewhere; unmeasured, issue 18). "
                 "Default 0",
    "FORGE_QUANT_KERNEL": "CUDA: `pipe` runs int4 (<= 128 tokens) and fp8 (<= 64 tokens) weight GEMMs with "
                          "quant_gemm_pipe.cu (weights streamed through a cp.async ring in shared memory; "
                          "unmeasured, issue 15), `default` quant_gemm.cu / cuBLAS. Read at import. Default: default",
    "CUDA_HOME / CUDA_PATH / CUDA_ROOT": "CUDA: toolkit folders whose include/ is tried next (then pip's nvidia "
                                         "packages)",
}


def env_table() -> str:
    read = set()
    for path in (ROOT / "forge").rglob("*.py"):
        text = path.read_text()  # os.environ.get("FORGE_X") / os.environ["FORGE_X"] / X_ENV = "FORGE_X"
        read |= set(re.findall(r"environ(?:\.get\(|\[)\s*[\"'](FORGE_\w+)", text))
        read |= set(re.findall(r"_ENV\s*=\s*[\"'](FORGE_\w+)", text))
    missing = sorted(read - set(ENV_VARS))
    if missing:
        raise SystemExit(f"forge reads {', '.join(missing)}: describe it in ENV_VARS of scripts/gen_docs.py")
    rows = ["| variable | what it does |", "| --- | --- |"]
    rows += [f"| `{name}` | {text} |" for name, text in ENV_VARS.items()]
    return "\n".join(rows)


def render(text: str, generated: dict[str, str]) -> str:
    def fill(m: re.Match) -> str:
        name = m.group("name")
        if name not in generated:
            raise SystemExit(f"unknown generated section {name!r}")
        return f"{m.group(1)}{generated[name]}\n{m.group(4)}"

    return MARKER.sub(fill, text)


def main(argv: list[str] | None = None) -> int:
    check = "--check" in (argv if argv is not None else sys.argv[1:])
    generated = sections()
    stale = []
    for page in PAGES:
        path = ROOT / page
        text = path.read_text()
        new = render(text, generated)
        if new != text:
            stale.append(page)
            if not check:
                path.write_text(new)
    if check and stale:
        print(f"out of date: {', '.join(stale)}; run `python scripts/gen_docs.py`", file=sys.stderr)
        return 1
    if not check:
        print(f"rewrote {', '.join(stale) or 'nothing'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
