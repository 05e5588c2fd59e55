"""The `forge` command: generate, chat, serve, bench.

Only argparse and forge's light modules load before a command runs: `--help`, `--version` and a bad
flag answer in ~0.1 s, without importing torch or reading the model."""

import argparse
import logging
import os
import signal
import sys
import time

EXAMPLES = """examples:
  forge generate "The capital of France is"
  forge generate --chat "Write a haiku about the sea" --temperature 0.7 --seed 1
  echo "The capital of France is" | forge generate
  forge chat --system "You are a pirate."
  forge serve --port 8000
  forge bench --batch-sizes 1 16
"""
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
CHAT_HELP = """commands:
  /help    show these commands
  /reset   forget the conversation (the system message stays)
  /exit    quit (also /quit, Ctrl-D or Ctrl-C)
Up/down arrows recall earlier lines. Start a message with // to send it with one leading /."""


def add_model_args(p: argparse.ArgumentParser) -> None:
    from forge.config import EngineConfig as E  # (light: no torch) the defaults are the dataclass's

    g = p.add_argument_group("model and engine")
    g.add_argument("--model", "-m", default=E.model, help="path to a .gguf file or an HF model directory "
                   "(default: the embedded SmolLM2-135M-Instruct Q4_1)")
    g.add_argument("--device", default=E.device, help="cpu or cuda[:N] (default: %(default)s)")
    g.add_argument("--dtype", default=E.dtype, choices=["auto", "float32", "float", "bfloat16", "float16", "half"],
                   help="compute dtype (auto: float32 on CPU, bfloat16 on CUDA; float = float32, half = float16)")
    g.add_argument("--max-model-len", type=int, default=E.max_model_len,
                   help="context length cap (default: model's, at most 8192)")
    g.add_argument("--max-num-seqs", type=int, default=E.max_num_seqs,
                   help="most sequences decoded together (default: %(default)s)")
    g.add_argument("--max-num-batched-tokens", type=int, default=E.max_num_batched_tokens,
                   help="token budget of one step; longer prompts are prefilled in chunks (default: %(default)s)")
    g.add_argument("--num-kv-blocks", type=int, default=E.num_kv_blocks,
                   help=f"KV-cache blocks of {E.block_size} tokens (default: sized from memory)")
    g.add_argument("--gpu-memory-utilization", type=float, default=E.gpu_memory_utilization,
                   help="fraction of GPU memory forge may use, KV cache included (default: %(default)s)")
    g.add_argument("--no-prefix-caching", action="store_true", help="disable reuse of cached prompt prefixes")
    g.add_argument("--enforce-eager", action="store_true", help="CUDA: run decode without CUDA graphs")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=E.async_scheduling,
                   help="launch each step before the previous one's tokens are read back "
                        "(default: on for one CUDA device, off otherwise)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=E.tensor_parallel_size,
                   help="split the model over N GPUs (one process each, NCCL; default: %(default)s)")
    g.add_argument("--max-logprobs", type=int, default=E.max_logprobs,
                   help="most logprobs a request may ask for; -1 = the whole vocabulary (default: %(default)s)")
    g.add_argument("--quantization", "-q", default=E.quantization, choices=["auto", "none", "int8", "int4", "fp8"],
                   help="weights: auto keeps a GGUF's quantized blocks (and on CUDA an HF FP8/AWQ/GPTQ checkpoint's) "
                        "quantized; none dequantizes to float (exact); int8 (CPU), int4, fp8 (CUDA) quantize float "
                        "weights at load (default: auto)")
    g.add_argument("--kv-cache-dtype", default=E.kv_cache_dtype, choices=["auto", "fp8", "fp8_e4m3"],
                   help="KV cache: auto = the compute dtype; fp8 = float8 e4m3, half the bytes (CUDA) (default: auto)")
    g.add_argument("--threads", type=int, default=E.threads,
                   help="CPU compute threads (default: torch's ops physical cores - 1, at least 1; forge's native "
                        "kernels every physical core while the machine is otherwise idle, one fewer when it is not)")
    g.add_argument("--speculative-config", default=E.speculative_config, metavar="JSON",
                   help='speculative decoding, as vLLM\'s: \'{"method": "ngram", "num_speculative_tokens": 4, '
                        '"prompt_lookup_max": 4, "prompt_lookup_min": 2}\' or \'{"method": "draft_model", "model": '
                        'PATH, "num_speculative_tokens": 4}\' (default: off)')
    g.add_argument("--kv-cache-memory", default=E.kv_cache_memory,
                   help="CPU KV-cache size: bytes, or e.g. 512MiB, 2GB (default: max-model-len x min(max-num-seqs, "
                        "4) tokens, at most 1/4 of RAM; pages become resident as sequences fill them)")
    g = p.add_argument_group("logging")
    g.add_argument("--log-level", choices=LOG_LEVELS, default=None,
                   help="forge's log level, and uvicorn's for `serve` (its access log is at info) "
                        "(default: info for serve, warning otherwise)")
    g.add_argument("--verbose", "-v", action="store_true", help="log engine details (KV blocks, backends): "
                   "--log-level info")


# The CLI's own defaults, which differ from SamplingParams' on purpose: greedy, so the same prompt gives
# the same text, and room for a full answer.
CLI_TEMPERATURE = 0.0
CLI_MAX_TOKENS = 256


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int = CLI_MAX_TOKENS) -> None:
    from forge.sampling_params import SamplingParams as S  # (light: no torch) the defaults are the dataclass's

    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens, help="most tokens to generate (default: %(default)s)")
    g.add_argument("--temperature", "-t", type=float, default=CLI_TEMPERATURE,
                   help=f"0 = greedy (the default here, so the same prompt gives the same text; the Python "
                        f"API and the server default to {S.temperature}, as vLLM and OpenAI do); higher = more random")
    g.add_argument("--top-p", type=float, default=S.top_p, help="nucleus sampling: keep the smallest set of tokens "
                   "whose probability reaches top_p (default: %(default)s = off)")
    g.add_argument("--top-k", type=int, default=S.top_k, help="keep only the k most likely tokens (default: %(default)s = off)")
    g.add_argument("--min-p", type=float, default=S.min_p,
                   help="drop tokens below min_p x the top probability (default: %(default)s = off)")
    g.add_argument("--repetition-penalty", type=float, default=S.repetition_penalty,
                   help="> 1 discourages repeats (default: %(default)s = off)")
    g.add_argument("--seed", type=int, default=S.seed, help="seed for reproducible sampling")
    g.add_argument("--stop", action="append", default=S.stop, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")


def engine_config(args):
    from forge.config import EngineConfig

    return EngineConfig(
        model=args.model, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        num_kv_blocks=args.num_kv_blocks, gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=not args.no_prefix_caching, enforce_eager=args.enforce_eager,
        async_scheduling=args.async_scheduling, tensor_parallel_size=getattr(args, "tensor_parallel_size", 1),
        max_logprobs=args.max_logprobs, quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
        threads=args.threads,
        kv_cache_memory=args.kv_cache_memory, speculative_config=args.speculative_config,
    )


def sampling_params(args):
    from forge import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop,
        ignore_eos=args.ignore_eos,
    )


def stream(engine, prompt, params, out=sys.stdout) -> tuple[str, int, float]:
    """Generate one completion, writing text as it arrives. Returns (text, tokens, seconds)."""
    request_id = engine.add_request(prompt, params)
    start, shown, text, n = time.perf_counter(), 0, "", 0
    try:
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.request_id != request_id:
                    continue
                completion = output.outputs[0]
                text, n = completion.text, len(completion.token_ids)
                out.write(text[shown:])
                out.flush()
                shown = len(text)
    except KeyboardInterrupt:
        engine.abort_request(request_id)
        raise
    return text, n, time.perf_counter() - start


def read_prompt(args) -> str:
    """The prompt argument, else stdin without its trailing newlines (`echo ... | forge generate` gives
    the same text as the argument, like the shell's $(...))."""
    if args.prompt is not None:
        return args.prompt
    if sys.stdin.isatty():  # nothing piped in: say what we wait for instead of hanging silently
        print("forge: type the prompt, then Ctrl-D on a new line (or pass it as an argument: "
              "forge generate \"...\")", file=sys.stderr, flush=True)
    return sys.stdin.read().rstrip("\r\n")


def cmd_generate(args) -> None:
    if args.system is not None and not args.chat:
        raise UsageError("--system is the system message of a chat: add --chat (or drop --system)")
    if args.echo and args.chat:
        raise UsageError("--echo prints a plain prompt before its completion; it cannot be used with --chat")
    config, params = engine_config(args), sampling_params(args)  # bad flags fail before torch and the model load
    prompt = read_prompt(args)
    engine = load_engine(config)
    if args.chat:
        tok = engine.tokenizer
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": prompt}]
        prompt = {"prompt_token_ids": tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))}
    if args.echo:
        sys.stdout.write(prompt)
    _, n, seconds = stream(engine, prompt, params)
    sys.stdout.write("\n")
    sys.stdout.flush()
    if args.stats:
        print(f"[{n} tokens in {seconds:.2f} s: {n / seconds:.1f} tok/s]", file=sys.stderr)


def load_engine(config):
    from forge.engine.llm_engine import LLMEngine

    return LLMEngine(config)


class ChatSession:
    """A conversation: each user turn is rendered with the whole history through the chat template.
    When the next turn no longer fits the context (with room for max_tokens), the oldest turns are
    dropped first; the system message always stays."""

    def __init__(self, engine, params, system: str | None = None):
        self.engine, self.params, self.system = engine, params, system
        self.reset()

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def prompt_ids(self, user_message: str, history: list[dict] | None = None) -> list[int]:
        tok = self.engine.tokenizer
        messages = (self.history if history is None else history) + [{"role": "user", "content": user_message}]
        return tok.encode(tok.apply_chat_template(messages))

    def fit(self, user_message: str) -> tuple[list[int], int]:
        """(prompt ids of the next turn, how many old turns were dropped to make it fit); the history
        is only shortened once the message is known to fit."""
        first_turn = 1 if self.system else 0
        room = self.engine.max_model_len - (self.params.max_tokens or 1)
        history = list(self.history)
        while len(ids := self.prompt_ids(user_message, history)) > room:
            if len(history) <= first_turn:
                from forge.errors import PromptTooLongError

                raise PromptTooLongError(
                    f"this message is {len(ids)} tokens with the chat template (and the system message) and the reply "
                    f"may take {self.params.max_tokens}, but the context holds {self.engine.max_model_len}: shorten "
                    f"it or lower --max-tokens", param="prompt")
            del history[first_turn:first_turn + 2]  # the oldest user message and its reply
        dropped = (len(self.history) - len(history)) // 2
        self.history = history
        return ids, dropped

    def send(self, user_message: str, out=sys.stdout) -> str:
        ids, dropped = self.fit(user_message)
        if dropped:
            print(f"[the conversation no longer fit the context of {self.engine.max_model_len} tokens: dropped the "
                  f"{dropped} oldest turn{'s' if dropped > 1 else ''}]", file=sys.stderr, flush=True)
        reply, _, _ = stream(self.engine, {"prompt_token_ids": ids}, self.params, out=out)
        self.history += [{"role": "user", "content": user_message}, {"role": "assistant", "content": reply}]
        return reply


def cmd_chat(args) -> None:
    config, params = engine_config(args), sampling_params(args)  # bad flags fail before torch and the model load
    from forge.errors import InvalidRequestError

    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (input() then edits the line, and up/down recall earlier ones)
    session = ChatSession(load_engine(config), params, args.system)
    if interactive:
        print("forge chat - /help lists the commands, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "").strip()
        except EOFError:  # Ctrl-D: leave the shell's prompt on a line of its own
            if interactive:
                print()
            return
        except KeyboardInterrupt:
            print()
            raise
        if line.startswith("/") and not line.startswith("//"):
            command = line.split()[0].lower()
            if command in ("/exit", "/quit"):
                return
            if command == "/reset":
                session.reset()
                print("[conversation cleared]", file=sys.stderr)
            elif command == "/help":
                print(CHAT_HELP, file=sys.stderr)
            else:  # a typo must not become a message to the model
                print(f"unknown command {command}: /help lists the commands (// sends a message that starts with /)",
                      file=sys.stderr)
            continue
        if line:
            try:
                session.send(line[1:] if line.startswith("//") else line)
                print()
            except InvalidRequestError as e:
                print(f"error: {e}", file=sys.stderr)
            except KeyboardInterrupt:
                print("\n[interrupted]", file=sys.stderr)


def cmd_serve(args) -> None:
    from forge.validation import check_float, check_int

    check_int(args.port, "port", 1, 65535)
    config = engine_config(args)  # bad flags fail before torch and the model load
    from forge.server.limits import ServerLimits

    limits = ServerLimits(max_waiting=args.max_waiting, max_connections=args.max_connections,
                          timeout_keep_alive=args.timeout_keep_alive, timeout_request_header=args.timeout_request_header,
                          timeout_request_body=args.timeout_request_body, shutdown_timeout=args.shutdown_timeout)
    allowed_hosts = [h for arg in args.allowed_hosts or [] for h in arg.split(",")]
    check_float(args.log_stats_interval, "log_stats_interval", 0)
    from forge.server.chat import ChatSettings, load_chat_template

    chat_settings = ChatSettings(load_chat_template(args.chat_template), args.tool_call_parser, args.reasoning_parser)
    from forge.server.listen import bind_socket

    sock = bind_socket(args.host, args.port)  # a port in use fails now, before torch and the model load
    from forge.server.api_server import serve

    serve(config, host=args.host, port=args.port, api_key=args.api_key, limits=limits,
          allowed_hosts=allowed_hosts, served_model_name=args.served_model_name, ui=not args.no_ui,
          log_level=args.log_level, log_stats_interval=args.log_stats_interval, sock=sock, chat_settings=chat_settings)


def cmd_bench(args) -> None:
    import random

    from forge.validation import check_int

    for size in args.batch_sizes:
        check_int(size, "batch_sizes", 1)
    check_int(args.prompt_len, "prompt_len", 1)
    check_int(args.output_len, "output_len", 1)
    config = engine_config(args)  # bad flags fail before torch and the model load
    from forge import SamplingParams

    engine = load_engine(config)
    rng = random.Random(0)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    print(f"{'batch':>6} {'prompt':>7} {'output':>7} {'seconds':>8} {'out tok/s':>10}", flush=True)
    for batch in args.batch_sizes:
        for timed in (False, True):  # the untimed round warms up (allocations, caches, CUDA graphs)
            if not timed:
                print(f"batch {batch}: warm-up round ({batch} x {args.prompt_len} prompt + {args.output_len} output "
                      f"tokens, not timed)...", file=sys.stderr, flush=True)
            for _ in range(batch):
                engine.add_request({"prompt_token_ids": [rng.randrange(vocab) for _ in range(args.prompt_len)]}, params)
            start = time.perf_counter()
            while engine.has_unfinished_requests():
                engine.step(emit="finished")
            seconds = time.perf_counter() - start
        print(f"{batch:>6} {args.prompt_len:>7} {args.output_len:>7} {seconds:>8.2f} {batch * args.output_len / seconds:>10.1f}",
              flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="forge", description="forge: LLM inference for Llama-family models.",
                            epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    from forge import __version__

    parser.add_argument("--version", action="version", version=f"forge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{generate,chat,serve,bench}")

    p = sub.add_parser("generate", help="complete a prompt, streaming the text", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="?", default=None,
                   help="the prompt (default: read stdin, without its trailing newlines)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the model's chat template")
    p.add_argument("--system", default=None, help="system message (needs --chat)")
    p.add_argument("--echo", action="store_true", help="print the prompt before the completion (not with --chat)")
    p.add_argument("--stats", action="store_true", help="print tokens/s to stderr at the end")
    add_model_args(p)
    add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat that keeps the conversation history",
                       description="Interactive chat. " + CHAT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--system", default=None, help="system message")
    add_model_args(p)
    add_sampling_args(p, max_tokens=512)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1/* "
                   "(default: $FORGE_API_KEY, which `ps` does not show; neither: no auth)")
    p.add_argument("--allowed-hosts", action="append", default=None, metavar="NAMES",
                   help="comma-separated Host names to accept besides the bound address (and localhost on "
                        "loopback); '*' = any, '*.example.com' = subdomains (default on 0.0.0.0: any)")
    from forge.server.limits import ServerLimits

    d = ServerLimits()  # the defaults live there, with the checks (see docs/RELIABILITY.md)
    g = p.add_argument_group("limits and timeouts")
    g.add_argument("--max-waiting", type=int, default=d.max_waiting,
                   help=f"queued prompts beyond which new requests get 503 (default: {d.max_waiting})")
    g.add_argument("--max-connections", type=int, default=d.max_connections,
                   help=f"open connections beyond which requests get 503 (default: {d.max_connections})")
    g.add_argument("--timeout-keep-alive", type=float, default=d.timeout_keep_alive,
                   help=f"seconds an idle keep-alive connection stays open (default: {d.timeout_keep_alive:g})")
    g.add_argument("--timeout-request-header", type=float, default=d.timeout_request_header,
                   help=f"seconds to send a whole request head, else 408 (default: {d.timeout_request_header:g})")
    g.add_argument("--timeout-request-body", type=float, default=d.timeout_request_body,
                   help=f"seconds to send a whole request body after its head, else 408 "
                        f"(default: {d.timeout_request_body:g})")
    g.add_argument("--shutdown-timeout", type=float, default=d.shutdown_timeout,
                   help=f"on SIGTERM/SIGINT, seconds running requests may finish before they are aborted "
                        f"(default: {d.shutdown_timeout:g})")
    p.add_argument("--served-model-name", default=None, help="model name clients use (default: the file's stem)")
    p.add_argument("--no-ui", action="store_true", help="do not serve the chat page at / (the API only)")
    p.add_argument("--log-stats-interval", type=float, default=10.0, metavar="SECONDS",
                   help="log a throughput line (running/waiting requests, prompt and generation tok/s, KV-cache "
                        "use) every SECONDS while there is traffic, at info level; 0 = never (default: 10)")
    g = p.add_argument_group("chat: templates, tools and reasoning")
    g.add_argument("--chat-template", default=None, metavar="FILE_OR_TEMPLATE",
                   help="a Jinja chat template (a file, or the template text) used instead of the model's")
    g.add_argument("--tool-call-parser", default="auto", choices=["auto", "none", "hermes", "llama3_json", "mistral"],
                   help='how tool calls are read from outputs with tool_choice "auto": hermes (<tool_call>, Qwen), '
                        "llama3_json, mistral ([TOOL_CALLS]); auto = detected from the chat template; none = "
                        'refuse "auto" ("required" and named functions always work) (default: auto)')
    g.add_argument("--reasoning-parser", default=None, choices=["deepseek_r1", "qwen3"],
                   help="split <think>...</think> into reasoning_content (DeepSeek-R1, Qwen3, QwQ); grammars "
                        "then start after the reasoning (default: off)")
    add_model_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench", help="offline decode throughput on random prompts",
                       description="For each batch size: one untimed warm-up round, then a timed round of that many "
                                   "random prompts, greedy, ignoring EOS; prints output tokens/s.")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16], metavar="N",
                   help="requests generated together, one timed round each (default: 1 16)")
    p.add_argument("--prompt-len", type=int, default=128, help="tokens in each random prompt (default: 128)")
    p.add_argument("--output-len", type=int, default=64, help="tokens generated per request (default: 64)")
    add_model_args(p)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 1 bad input or a forge error (one line on stderr, no traceback), 130 Ctrl-C,
    141 stdout closed early (`forge generate ... | head -1`), like a Unix tool killed by SIGPIPE."""
    try:
        return _run(argv)
    except BrokenPipeError:
        # Point stdout at /dev/null so the interpreter's final flush does not fail (and print) again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def _run(argv: list[str] | None) -> int:
    from forge.errors import ForgeError, InvalidRequestError

    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        return fail(str(e))
    if args.log_level is None:
        args.log_level = "info" if args.verbose or args.command == "serve" else "warning"
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(asctime)s %(name)s: %(message)s",
                        datefmt="%m-%d %H:%M:%S")
    try:
        args.func(args)
    except UsageError as e:
        return fail(str(e))
    except InvalidRequestError as e:
        flag = args.flags.get(e.param)
        return fail(f"{e} ({flag})" if flag else str(e))
    except ForgeError as e:
        return fail(str(e))
    except KeyboardInterrupt:
        return 130
    return 0


def fail(message: str) -> int:
    print(f"forge: error: {' '.join(message.split())}", file=sys.stderr)  # always one line
    return 1


class UsageError(Exception):
    """A flag argparse could not parse (unknown flag, `--max-num-seqs abc`, ...) or flags that do not
    go together (`--system` without `--chat`)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag like every other error: one line, exit code 1 (no usage dump),
    and records each subcommand's {field: --flag} so a config error can name the flag."""

    def error(self, message: str):
        raise UsageError(f"{message} (see `{self.prog} --help`)")

    def set_defaults(self, **kwargs) -> None:
        flags = {a.dest: next((o for o in a.option_strings if o.startswith("--")), a.option_strings[0])
                 for a in self._actions if a.option_strings}
        super().set_defaults(flags=flags, **kwargs)


if __name__ == "__main__":
    sys.exit(main())
