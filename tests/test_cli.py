"""The `forge` command as a newcomer meets it: --version/--help without torch, flags that do not go together,
piped and typed prompts, `forge chat` in a real terminal (pexpect), `forge bench`, and `forge serve`'s
start-up (port checked before the model loads) and logs (access log, periodic throughput line)."""

import logging
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

pexpect = pytest.importorskip("pexpect", reason="needs pexpect (the test extra)")

FORGE = [sys.executable, "-m", "forge"]


def run_forge(*args: str, input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*FORGE, *args], input=input, capture_output=True, text=True, timeout=timeout,
                          stdin=None if input is not None else subprocess.DEVNULL)


def spawn_forge(*args: str, timeout: float = 120) -> "pexpect.spawn":
    """`forge ARGS` with a pseudo-terminal on stdin/stdout/stderr, as a user at a terminal runs it."""
    child = pexpect.spawn(sys.executable, ["-m", "forge", *args], encoding="utf-8", timeout=timeout,
                          dimensions=(40, 200), env=dict(os.environ, TERM="xterm"))
    child.logfile_read = LogTail()
    return child


class LogTail:
    """What the terminal showed, kept for assertion messages."""

    def __init__(self):
        self.text = ""

    def write(self, data: str) -> None:
        self.text += data

    def flush(self) -> None:
        pass


def test_version_help_and_bad_flag_combinations_answer_without_torch():
    """--version, --help and flag errors answer at once: torch and the model are never imported."""
    code = """
import contextlib, io, sys
from forge.cli import main
for argv in (["--version"], ["generate", "--help"], ["bench", "--help"], ["chat", "--help"]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main(argv)
        except SystemExit as e:
            assert e.code == 0, (argv, e.code)
    print(out.getvalue())
print("exit", main(["generate", "hi", "--system", "be brief"]))
print("exit", main(["generate", "hi", "--chat", "--echo"]))
print("exit", main(["generate", "hi", "--dtype", "half", "--log-level", "loud"]))
print("torch imported:", "torch" in sys.modules)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    import forge

    assert r.stdout.startswith(f"forge {forge.__version__}\n"), r.stdout[:200]
    assert "torch imported: False" in r.stdout
    assert r.stdout.count("exit 1") == 3
    errors = r.stderr.splitlines()
    assert errors[0] == "forge: error: --system is the system message of a chat: add --chat (or drop --system)"
    assert errors[1] == ("forge: error: --echo prints a plain prompt before its completion; it cannot be used with "
                         "--chat")
    assert errors[2].startswith("forge: error: argument --log-level: invalid choice: 'loud'")
    # every bench option explains itself, and the chat help lists the commands
    for text in ("requests generated together", "tokens in each random prompt", "tokens generated per request",
                 "warm-up", "/reset", "/exit", "--log-level", "--max-logprobs", "half"):
        assert text in r.stdout, text


def test_piped_prompt_equals_the_argument_and_a_terminal_is_told_what_to_type(tiny):
    prompt = "The capital of France is"
    piped = run_forge("generate", "--model", tiny, "--max-tokens", "6", "--echo", "--stats", input=prompt + "\n\n")
    assert piped.returncode == 0, piped.stderr
    argument = run_forge("generate", prompt, "--model", tiny, "--max-tokens", "6", "--echo")
    assert argument.returncode == 0, argument.stderr
    assert piped.stdout == argument.stdout and piped.stdout.startswith(prompt) and len(piped.stdout) > len(prompt) + 1
    assert "tok/s]" in piped.stderr and "type the prompt" not in piped.stderr

    child = spawn_forge("generate", "--model", tiny, "--max-tokens", "3")
    child.expect("type the prompt, then Ctrl-D")  # said at once, before the model loads
    child.send("Hello there\n")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.logfile_read.text


def test_chat_in_a_terminal(tiny):
    child = spawn_forge("chat", "--model", tiny, "--max-tokens", "4")
    child.expect("/help lists the commands")
    child.expect("> ")
    child.sendline("/help")
    child.expect("/reset +forget the conversation")
    child.expect("> ")
    child.sendline("/wat")  # a typo is not sent to the model
    child.expect(r"unknown command /wat: /help lists the commands")
    child.expect("> ")
    # Line editing (readline): Left moves the cursor instead of inserting "^[[D", Up recalls a line.
    child.send("helo\x1b[Dl\r")
    child.expect("> ")
    assert "^[[D" not in child.logfile_read.text
    child.send("\x1b[A")  # the previous line comes back
    child.expect("hello")
    child.send("\x15")  # Ctrl-U: clear it
    child.sendline("/reset")
    child.expect(r"\[conversation cleared\]")
    child.expect("> ")
    child.sendeof()  # Ctrl-D: exit 0, the shell's prompt starts on a new line
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.logfile_read.text
    assert child.logfile_read.text.endswith("> \r\n"), repr(child.logfile_read.text[-40:])

    child = spawn_forge("chat", "--model", tiny, "--max-tokens", "4")
    child.expect("> ")
    child.sendintr()  # Ctrl-C at the prompt: exit, with the newline
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130 and "Traceback" not in child.logfile_read.text, child.logfile_read.text
    assert child.logfile_read.text.endswith("> ^C\r\n") or child.logfile_read.text.endswith("> \r\n"), \
        repr(child.logfile_read.text[-40:])


def test_chat_trims_the_oldest_turns_and_explains_a_message_too_long(tiny, capsys):
    from forge import LLM, SamplingParams
    from forge.cli import ChatSession
    from forge.errors import PromptTooLongError

    llm = LLM(tiny, max_model_len=160, num_kv_blocks=32)
    session = ChatSession(llm.llm_engine, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), system="Hi.")
    with pytest.raises(PromptTooLongError, match=r"this message is \d+ tokens .* the context holds 160: shorten it "
                                                 r"or lower --max-tokens"):
        session.send("word " * 200, out=open(os.devnull, "w"))
    assert session.history == [{"role": "system", "content": "Hi."}]
    dropped_at = None
    for turn in range(12):
        session.send(f"message number {turn} with a few more words in it", out=open(os.devnull, "w"))
        err = capsys.readouterr().err
        if "dropped" in err:
            dropped_at = turn
            assert "no longer fit the context of 160 tokens: dropped the 1 oldest turn" in err
            break
    assert dropped_at is not None and dropped_at >= 2
    users = [m["content"] for m in session.history if m["role"] == "user"]
    assert session.history[0]["role"] == "system" and "message number 0 " not in " ".join(users)
    assert users[-1].startswith(f"message number {dropped_at} ")
    history = list(session.history)
    with pytest.raises(PromptTooLongError):  # a message that cannot fit leaves the history as it was
        session.send("word " * 200, out=open(os.devnull, "w"))
    assert session.history == history


def test_bench_says_it_warms_up(tiny):
    r = run_forge("bench", "--model", tiny, "--batch-sizes", "2", "--prompt-len", "4", "--output-len", "2")
    assert r.returncode == 0, r.stderr
    assert "batch 2: warm-up round (2 x 4 prompt + 2 output tokens, not timed)" in r.stderr
    header, row = r.stdout.strip().splitlines()
    assert header.split() == ["batch", "prompt", "output", "seconds", "out", "tok/s"]
    assert row.split()[:3] == ["2", "4", "2"] and float(row.split()[-1]) > 0


def test_serve_fails_at_once_on_a_port_in_use(tiny):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.perf_counter()
        r = run_forge("serve", "--model", tiny, "--port", str(port))
        seconds = time.perf_counter() - start
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == (f"forge: error: cannot listen on 127.0.0.1:{port}: Address already in use; another "
                                f"process listens there: stop it or pick another --port")
    assert seconds < 5, seconds  # neither torch nor the model was loaded first (~0.3 s; a load takes several)


def test_serve_logs_requests_and_throughput(tiny, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([*FORGE, "serve", "--model", tiny, "--port", str(port), "--log-stats-interval", "0.3"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "forge serve did not start"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        r = httpx.post(url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 24, "ignore_eos": True},
                       timeout=60)
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 10
        while "generation: " not in (tmp_path / "serve.log").read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()
        log.close()
    text = (tmp_path / "serve.log").read_text()
    assert '"POST /v1/completions HTTP/1.1" 200' in text, text  # uvicorn's access log, on at the info level
    stats = [line for line in text.splitlines() if "generation: " in line]
    assert stats and "running: " in stats[0] and "KV cache: " in stats[0], text
    rates = [float(line.split("generation: ")[1].split(" tok/s")[0]) for line in stats]
    assert max(rates) > 0, stats


def test_log_level_reaches_uvicorn():
    """`--log-level warning` (passed to serve() as log_level) silences uvicorn's access log."""
    from forge.server.limits import ServerLimits
    from forge.server.uvicorn_server import make_server

    for level in ("warning", "info"):
        make_server(lambda *a: None, ServerLimits(), on_drain=lambda: None, on_abort=lambda: 0, log_level=level)
        assert logging.getLogger("uvicorn.access").level == getattr(logging, level.upper())


def test_stats_line_is_quiet_when_idle():
    from types import SimpleNamespace

    from forge.server.async_engine import EngineSnapshot
    from forge.server.stats_log import StatsLogger

    engine = SimpleNamespace(stats={"prompt_tokens": 0, "generation_tokens": 0})
    async_engine = SimpleNamespace(engine=engine, snapshot=EngineSnapshot())
    log = StatsLogger(async_engine, interval=1.0)
    assert log.line() is None  # nothing ran: nothing to say
    engine.stats.update(prompt_tokens=100, generation_tokens=40)
    async_engine.snapshot = EngineSnapshot(num_running=2, num_waiting=1, kv_cache_usage=0.25, prefix_cache_hit_rate=0.5)
    line = log.line()
    assert line.startswith("running: 2 reqs, waiting: 1 reqs, prompt: ") and "KV cache: 25.0%" in line
    assert "prefix cache hits: 50.0%" in line
    async_engine.snapshot = EngineSnapshot()
    assert "generation: 0.0 tok/s" in log.line()  # the first idle interval is reported once...
    assert log.line() is None  # ...then it stays quiet
