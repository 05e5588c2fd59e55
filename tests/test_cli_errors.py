"""`forge` with bad flag values: exit code 1, one line on stderr, no traceback, within seconds (checked
before the model loads where the value alone is wrong); and a closed stdout ends quietly."""

import os
import subprocess
import sys
import time

import pytest

MODEL_FREE = [  # wrong on their own: rejected before torch and the model load
    ("generate", "hi", "-t", "nan"),
    ("generate", "hi", "-t", "inf"),
    ("generate", "hi", "--temperature", "-1"),
    ("generate", "hi", "--repetition-penalty", "nan"),
    ("generate", "hi", "--repetition-penalty", "1e-38"),
    ("generate", "hi", "--top-p", "0"),
    ("generate", "hi", "--min-p", "nan"),
    ("generate", "hi", "--top-k", "-3"),
    ("generate", "hi", "--seed", str(2**70)),
    ("generate", "hi", "--max-tokens", "0"),
    ("generate", "hi", "--max-num-seqs", "0"),
    ("generate", "hi", "--max-num-seqs", "-1"),
    ("generate", "hi", "--max-num-batched-tokens", "0"),
    ("generate", "hi", "--device", "CPU"),
    ("generate", "hi", "--device", "mps"),
    ("generate", "hi", "--device", "tpu"),
    ("generate", "hi", "--max-model-len", "-5"),
    ("generate", "hi", "--max-model-len", "0"),
    ("generate", "hi", "--num-kv-blocks", "-1"),
    ("generate", "hi", "--num-kv-blocks", "0"),
    ("generate", "hi", "-tp", "0"),
    ("generate", "hi", "--gpu-memory-utilization", "1.5"),
    ("generate", "hi", "--model", ""),
    ("generate", "hi", "--max-num-seqs", "abc"),
    ("generate", "hi", "--no-such-flag"),
    ("chat", "-t", "nan"),
    ("serve", "--port", "99999"),
    ("serve", "--port", "-1"),
    ("serve", "--max-num-seqs", "0"),
    ("bench", "--batch-sizes", "0"),
    ("bench", "--output-len", "-4"),
]


def run_forge(*args: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "forge", *args], capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    return r, time.perf_counter() - start


def assert_one_line_error(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("forge: error: "), r.stderr[-2000:]


@pytest.mark.parametrize("args", MODEL_FREE, ids=lambda a: " ".join(a))
def test_bad_flag_values_fail_fast_in_one_line(args):
    r, seconds = run_forge(*args)
    assert_one_line_error(r)
    assert seconds < 10, seconds  # nothing was loaded (about 0.1 s; a model load takes several)
    assert r.stdout == ""


def test_error_names_the_value_range_and_flag():
    r, _ = run_forge("generate", "hi", "--max-num-seqs", "0")
    assert r.stderr.strip() == "forge: error: max_num_seqs must be an integer >= 1, got 0 (--max-num-seqs)"
    r, _ = run_forge("generate", "hi", "-t", "nan")
    assert "temperature must be a finite number >= 0, got nan (--temperature)" in r.stderr
    r, _ = run_forge("serve", "--port", "99999")
    assert "port must be an integer in [1, 65535], got 99999 (--port)" in r.stderr


def test_max_model_len_beyond_the_model_context(tiny):
    """Needs the model's context, so the (tiny) model loads: the error states the model's limit."""
    r, _ = run_forge("generate", "hi", "--model", tiny, "--max-model-len", "100000")
    assert_one_line_error(r)
    assert "max_model_len 100000 is greater than the model's context of 2048 tokens" in r.stderr


def test_closed_stdout_ends_quietly(tiny):
    """`forge generate ... | head -1`: the reader goes away; forge stops like a Unix tool on SIGPIPE."""
    read_end, write_end = os.pipe()
    p = subprocess.Popen([sys.executable, "-m", "forge", "generate", "hello", "--model", tiny, "--max-tokens", "64",
                          "--ignore-eos", "--echo"], stdout=write_end, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL)
    os.close(write_end)
    os.close(read_end)  # before the model has loaded: the first write finds no reader
    try:
        _, stderr = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 141, (p.returncode, stderr.decode()[-2000:])
    assert stderr == b"", stderr.decode()[-2000:]
