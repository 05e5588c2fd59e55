"""Bad input gets a specific one-line error and leaves the engine working."""

import subprocess
import sys

import pytest

from forge import SamplingParams
from forge.errors import InvalidRequestError, PromptTooLongError


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_k": -5}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"n": 0}, "n"),
        ({"logprobs": -5}, "logprobs"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ],
)
def test_invalid_sampling_values(kwargs, param):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param
    assert "\n" not in str(e.value) and str(list(kwargs.values())[0]) in str(e.value)


def test_empty_and_too_long_prompts_leave_engine_clean(tiny_model_dir):
    from forge import LLM

    llm = LLM(str(tiny_model_dir), max_model_len=64, num_kv_blocks=16)
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.generate("", SamplingParams(max_tokens=4), use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.generate({"prompt_token_ids": []}, SamplingParams(max_tokens=4), use_tqdm=False)
    with pytest.raises(PromptTooLongError, match="100 tokens.*64"):
        llm.generate({"prompt_token_ids": [5] * 100}, SamplingParams(max_tokens=4), use_tqdm=False)
    with pytest.raises(PromptTooLongError, match=r"60 tokens\) \+ max_tokens \(10\) = 70.*64"):
        llm.generate({"prompt_token_ids": [5] * 60}, SamplingParams(max_tokens=10), use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        llm.generate({"prompt_token_ids": [10**9]}, SamplingParams(max_tokens=4), use_tqdm=False)
    # A bad prompt in a batch rejects the batch and leaves nothing queued.
    with pytest.raises(InvalidRequestError):
        llm.generate(["fine", ""], SamplingParams(max_tokens=4), use_tqdm=False)
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests() and not engine.requests
    out = llm.generate("still works", SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 4


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "forge", *args], capture_output=True, text=True, timeout=timeout)


def test_cli_errors_are_one_line(tmp_path, tiny_model_dir):
    r = run_cli("generate", "hi", "--model", str(tmp_path / "missing.gguf"))
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "model not found" in r.stderr
    assert "Traceback" not in r.stderr
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    r = run_cli("generate", "hi", "--model", str(bad))
    assert r.returncode == 1 and "cannot read GGUF" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("generate", "hi", "--model", str(tiny_model_dir), "--top-p", "2")
    assert r.returncode == 1 and "top_p must be a finite number in (0, 1]" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("generate", "", "--model", str(tiny_model_dir))
    assert r.returncode == 1 and "prompt is empty" in r.stderr


def test_cli_help_explains_flags():
    r = run_cli("generate", "--help")
    assert r.returncode == 0
    for flag in ("--temperature", "--top-p", "--top-k", "--min-p", "--seed", "--max-tokens", "--model", "--stop"):
        assert flag in r.stdout


def test_cli_generate_streams_and_chat_keeps_history(tiny_model_dir, default_model_path):
    r = run_cli("generate", "The capital of France is", "--max-tokens", "8")
    assert r.returncode == 0 and r.stdout.startswith(" Paris."), r.stdout + r.stderr
    # The same greedy text with async scheduling forced on (the CUDA default) on the CPU.
    r2 = run_cli("generate", "The capital of France is", "--max-tokens", "8", "--async-scheduling")
    assert r2.returncode == 0 and r2.stdout == r.stdout, r2.stdout + r2.stderr
    # Chat over stdin: two turns, two replies, clean exit.
    p = subprocess.run(
        [sys.executable, "-m", "forge", "chat", "--max-tokens", "12"],
        input="My name is Alice.\nWhat is my name?\n", capture_output=True, text=True, timeout=180,
    )
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    assert len([line for line in p.stdout.split("\n") if line.strip()]) >= 2


def test_chat_session_keeps_history(default_llm):
    from forge.cli import ChatSession

    session = ChatSession(default_llm.llm_engine, SamplingParams(temperature=0, max_tokens=12), system="Be brief.")
    first = session.send("My name is Alice.", out=open("/dev/null", "w"))
    second_prompt = default_llm.get_tokenizer().decode(session.prompt_ids("What is my name?"), skip_special_tokens=False)
    assert "My name is Alice." in second_prompt and first.strip() in second_prompt and "Be brief." in second_prompt
    session.send("What is my name?", out=open("/dev/null", "w"))
    assert [m["role"] for m in session.history] == ["system", "user", "assistant", "user", "assistant"]
    session.reset()
    assert session.history == [{"role": "system", "content": "Be brief."}]
