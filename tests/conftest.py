import json
from pathlib import Path

import pytest
import torch

# HF transformers fp32 greedy outputs of the default model (a copy of shared/reference/, so the tests never skip).
REFERENCE = Path(__file__).resolve().parent / "data" / "smollm2_135m_q4_1_greedy.json"

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def reference_cases() -> list[dict]:
    return json.loads(REFERENCE.read_text())


@pytest.fixture(scope="session")
def default_model_path():
    from forge.loader import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def default_loaded(default_model_path):
    from forge.loader import load_model

    return load_model(default_model_path)


@pytest.fixture(scope="session")
def default_llm():
    """The real default model on the CPU, shared by every test that only reads from it."""
    from forge import LLM

    return LLM(max_model_len=2048, num_kv_blocks=512)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_loaded):
    """A random-weight Llama with the default model's tokenizer: fast enough for scheduler tests."""
    from tests.util import make_random_model_dir

    return make_random_model_dir(tmp_path_factory.mktemp("tiny"), default_loaded.tokenizer)


@pytest.fixture(scope="session")
def tiny(tiny_model_dir) -> str:
    """tiny_model_dir as the path string LLM() takes."""
    return str(tiny_model_dir)
