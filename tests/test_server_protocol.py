"""Request bodies -> SamplingParams, without a server."""

import pytest

from forge.sampling_params import StructuredOutputsParams
from forge.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, parse_json_object, validate

MESSAGES = [{"role": "user", "content": "hi"}]


def chat_params(**body):
    req = validate(ChatCompletionRequest, {"messages": MESSAGES, **body})
    return req.sampling_params(req.max_new_tokens, req.num_logprobs)


def test_defaults_follow_openai():
    p = chat_params()
    assert (p.n, p.temperature, p.top_p, p.max_tokens) == (1, 1.0, 1.0, None)
    assert p.logprobs is None and p.structured_outputs is None
    req = validate(CompletionRequest, {"prompt": "x"})
    assert req.sampling_params(req.max_tokens, req.logprobs).max_tokens == 16


def test_sampling_fields_are_passed_through():
    p = chat_params(n=2, temperature=0.5, top_p=0.9, top_k=-1, min_p=0.1, seed=3, stop="END", presence_penalty=0.5,
                    frequency_penalty=-0.5, repetition_penalty=1.1, max_tokens=7, logprobs=True, top_logprobs=3)
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.seed, p.stop) == (2, 0.5, 0.9, 0, 0.1, 3, ["END"])
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -0.5, 1.1)
    assert (p.max_tokens, p.logprobs) == (7, 3)
    assert chat_params(max_tokens=7, max_completion_tokens=2).max_tokens == 2
    assert chat_params(logprobs=True).logprobs == 0


@pytest.mark.parametrize("body, expected", [
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": {"type": "json_object"}}, StructuredOutputsParams(json_object=True)),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object"}}}},
     StructuredOutputsParams(json={"type": "object"})),
    ({"structured_outputs": {"regex": "a+"}}, StructuredOutputsParams(regex="a+")),
    ({"structured_outputs": {"choice": ["x", "y"]}}, StructuredOutputsParams(choice=["x", "y"])),
    ({"structured_outputs": {"grammar": 'root ::= "a"'}}, StructuredOutputsParams(grammar='root ::= "a"')),
    ({"structured_outputs": {"json": {"type": "string"}}}, StructuredOutputsParams(json={"type": "string"})),
    ({"guided_json": '{"type": "string"}'}, StructuredOutputsParams(json='{"type": "string"}')),
    ({"guided_regex": "[0-9]+"}, StructuredOutputsParams(regex="[0-9]+")),
    ({"guided_choice": ["a"]}, StructuredOutputsParams(choice=["a"])),
    ({"guided_grammar": 'root ::= "b"'}, StructuredOutputsParams(grammar='root ::= "b"')),
])
def test_structured_outputs_mapping(body, expected):
    assert chat_params(**body).structured_outputs == expected


def test_errors_name_the_field():
    with pytest.raises(APIError) as e:
        validate(ChatCompletionRequest, {"messages": [{"role": "user", "content": 5}]})
    assert e.value.param == "messages[0].content" and "got 5" in e.value.message
    with pytest.raises(APIError) as e:
        validate(ChatCompletionRequest, {})
    assert e.value.param == "messages" and "required" in e.value.message
    with pytest.raises(APIError, match="UTF-8"):
        parse_json_object(b'{"a": "\xff"}')
