"""The docs list every option the code has: each CLI flag in docs/CLI.md, each LLM/SamplingParams/output
field in docs/PYTHON_API.md, each `forge serve` flag, request field and metric in docs/SERVER.md, and each
environment variable forge reads in the README. A failure means: run `python scripts/gen_docs.py` (and
describe what it cannot find). Also checks what the docs claim about defaults."""

import argparse
import dataclasses
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIX = "run `python scripts/gen_docs.py` to regenerate the docs' tables"


def gen_docs():
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def page(name: str) -> str:
    return (ROOT / name).read_text()


def test_every_cli_flag_is_documented():
    from forge.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    cli, server = page("docs/CLI.md"), page("docs/SERVER.md")
    for command, subparser in sub.choices.items():
        assert f"## forge {command}" in cli
        for action in subparser._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}`" in cli, f"forge {command} {flag} is not in docs/CLI.md: {FIX}"
                    if command == "serve" and action.container.title not in gen_docs().SHARED_GROUPS:
                        assert f"`{flag}`" in server, f"forge serve {flag} is not in docs/SERVER.md: {FIX}"
    assert "`--version`" in cli or "forge --version" in cli


def test_every_api_field_is_documented():
    from forge.config import EngineConfig
    from forge.llm import _NOT_APPLICABLE
    from forge.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
    from forge.sampling_params import SamplingParams, StructuredOutputsParams

    api = page("docs/PYTHON_API.md")
    for cls in (EngineConfig, SamplingParams, StructuredOutputsParams, RequestOutput, CompletionOutput, Logprob,
                RequestMetrics):
        for f in dataclasses.fields(cls):
            if not (cls is EngineConfig and f.name == "model"):
                assert f"| `{f.name}` |" in api, f"{cls.__name__}.{f.name} is not in docs/PYTHON_API.md: {FIX}"
    for name in _NOT_APPLICABLE:
        assert f"| `{name}` |" in api, f"LLM({name}=...) is not in docs/PYTHON_API.md: {FIX}"
    for method in ("LLM.generate", "LLM.chat", "LLM.get_tokenizer"):
        assert method in api


def test_every_server_field_and_metric_is_documented():
    from forge.server import protocol
    from forge.server.metrics import ServerMetrics

    server = page("docs/SERVER.md")
    for model in (protocol.CompletionRequest, protocol.ChatCompletionRequest):
        for name, info in model.model_fields.items():
            assert f"| `{info.alias or name}` |" in server, f"{model.__name__}.{name} is not in docs/SERVER.md: {FIX}"
    for metric in ServerMetrics().registry.collect():
        assert f"`{metric.name}`" in server, f"metric {metric.name} is not in docs/SERVER.md: {FIX}"


def test_every_environment_variable_is_in_the_readme():
    table = gen_docs().env_table()  # fails itself when forge reads a FORGE_* variable it does not describe
    readme = page("README.md")
    for line in table.splitlines()[2:]:
        assert line in readme, f"{line.split('|')[1].strip()} is not in README.md: {FIX}"


def test_server_defaults_are_sampling_params_defaults():
    """SERVER.md says an omitted sampling field takes SamplingParams' default."""
    from forge.sampling_params import SamplingParams
    from forge.server.protocol import ChatCompletionRequest, CompletionRequest

    defaults = SamplingParams()
    for req in (CompletionRequest(prompt="hi"), ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}])):
        params = req.sampling_params(16, None)
        for f in dataclasses.fields(SamplingParams):
            if f.name in type(req).model_fields and f.name not in ("max_tokens", "logprobs"):
                assert getattr(params, f.name) == getattr(defaults, f.name), f.name


@pytest.mark.parametrize("name", ["docs/CLI.md", "docs/PYTHON_API.md", "docs/SERVER.md", "README.md"])
def test_generated_sections_are_filled(name):
    text = page(name)
    docs = gen_docs()
    sections = list(docs.MARKER.finditer(text))
    assert sections or name == "README.md"
    for m in sections:
        assert m.group("body").strip(), f"{name}: the generated section {m.group('name')} is empty: {FIX}"
