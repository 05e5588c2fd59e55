"""tool_choice "required" and named functions: request checks, the JSON schemas forced on the output
(compiled by forge's xgrammar backend), and constrained generations with the default model whose
calls parse (streamed token by token or whole) and validate against each function's schema."""

import json

import pytest

from forge import LLM, SamplingParams, StructuredOutputsParams
from forge.errors import InvalidRequestError
from forge.structured import get_backend
from forge.tokenizer import IncrementalDetokenizer
from forge.tools import (
    assemble,
    call_id_factory,
    constrained_tool_parser,
    parse_constrained_tool_calls,
    resolve_tool_choice,
    tool_call_schema,
    validate_tools,
)

jsonschema = pytest.importorskip("jsonschema")


def _tool(name, parameters=None, description="a tool"):
    function = {"name": name, "description": description}
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12},
                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
}
ADD = {
    "type": "object",
    "properties": {"a": {"type": "integer", "minimum": -99, "maximum": 99},
                   "b": {"type": "integer", "minimum": -99, "maximum": 99}},
    "required": ["a", "b"],
}
# As pydantic writes a model with a nested one: $defs and $ref, which must survive being nested
# inside the "required" array schema.
BOOK = {
    "$defs": {"Passenger": {"type": "object",
                            "properties": {"name": {"type": "string", "maxLength": 10},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
                            "required": ["name", "age"]}},
    "type": "object",
    "properties": {"to": {"type": "string", "enum": ["PAR", "TYO", "NYC"]}, "passenger": {"$ref": "#/$defs/Passenger"}},
    "required": ["to", "passenger"],
}
TOOLS = [_tool("get_weather", WEATHER), _tool("add", ADD), _tool("book_flight", BOOK), _tool("now")]
PARAMETERS = {"get_weather": WEATHER, "add": ADD, "book_flight": BOOK, "now": {"type": "object", "properties": {}}}


@pytest.mark.parametrize("tools, words", [
    ({"type": "function"}, ["must be a list"]),
    (["get_weather"], ["tools[0]", '"type": "function"']),
    ([{"type": "code_interpreter"}], ["tools[0]"]),
    ([{"type": "function"}], ["tools[0].function must be an object"]),
    ([_tool("get weather")], ["tools[0].function.name", "'get weather'"]),
    ([_tool("x" * 65)], ["1-64"]),
    ([_tool("f"), _tool("g"), _tool("f")], ["tools[2]", "two tools are named 'f'"]),
    ([_tool("f", parameters=["a"])], ["tools[0].function.parameters must be a JSON schema object"]),
    ([_tool("f", parameters={"type": "objekt"})], ["tools[0].function.parameters is not a valid JSON schema", "objekt"]),
    ([_tool("f", description=3)], ["description must be a string"]),
])
def test_bad_tools_are_clear_errors(tools, words):
    with pytest.raises(InvalidRequestError) as err:
        validate_tools(tools)
    assert err.value.param == "tools" and "\n" not in str(err.value)
    for word in words:
        assert word in str(err.value)


def test_tool_choice():
    functions = validate_tools(TOOLS)
    assert [f["name"] for f in functions] == ["get_weather", "add", "book_flight", "now"]
    assert validate_tools(None) == validate_tools([]) == []
    assert resolve_tool_choice(None, functions) == "auto"
    assert resolve_tool_choice(None, []) == "none"
    assert resolve_tool_choice("none", []) == "none"
    assert resolve_tool_choice("required", functions) == "required"
    assert resolve_tool_choice({"type": "function", "function": {"name": "add"}}, functions) == "add"
    for choice in ("auto", "required"):
        with pytest.raises(InvalidRequestError, match="needs tools") as err:
            resolve_tool_choice(choice, [])
        assert err.value.param == "tool_choice"
    for choice, match in [
        ({"type": "function", "function": {"name": "sub"}}, "'sub', which is not one of the tools"),
        ({"type": "function", "name": "add"}, "must be"),
        ("any", "got 'any'"),
        (3, "got 3"),
    ]:
        with pytest.raises(InvalidRequestError, match=match) as err:
            resolve_tool_choice(choice, functions)
        assert err.value.param == "tool_choice"


def test_schemas():
    functions = validate_tools(TOOLS)
    assert tool_call_schema(functions, "auto") is None and tool_call_schema(functions, "none") is None
    assert tool_call_schema(functions, "add") == ADD
    assert tool_call_schema(functions, "now") == {"type": "object", "properties": {}}
    parallel = tool_call_schema(functions, "required")
    single = tool_call_schema(functions, "required", parallel_tool_calls=False)
    assert parallel["minItems"] == 1 and "maxItems" not in parallel and single["maxItems"] == 1
    assert len(parallel["items"]["anyOf"]) == 4
    # The schema accepts exactly the calls it should (its $refs were rewritten correctly).
    good = [{"name": "book_flight", "arguments": {"to": "PAR", "passenger": {"name": "Ann", "age": 30}}},
            {"name": "now", "arguments": {}}]
    jsonschema.validate(good, parallel)
    for bad in ([], [{"name": "book_flight", "arguments": {"to": "PAR", "passenger": {"name": "Ann"}}}],
                [{"name": "nope", "arguments": {}}], [{"name": "add"}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, parallel)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(good, single)
    with pytest.raises(ValueError, match="not constrained"):
        constrained_tool_parser("auto")


@pytest.fixture(scope="module")
def llm():
    return LLM(max_model_len=2048, num_kv_blocks=512, max_num_seqs=16)


def test_schemas_compile_in_forge_backend(llm):
    backend = get_backend(llm.llm_engine)
    functions = validate_tools(TOOLS)
    for choice in ["required", "get_weather", "add", "book_flight", "now"]:
        for parallel in (True, False):
            backend.compile(StructuredOutputsParams(json=tool_call_schema(functions, choice, parallel)))


def _chat(llm, text):
    tok = llm.llm_engine.tokenizer
    return {"prompt_token_ids": tok.encode(tok.apply_chat_template([{"role": "user", "content": text}], tools=TOOLS)),
            "prompt": None}


def _token_pieces(llm, out):
    """The output text as a server would stream it: one piece per token."""
    detok = IncrementalDetokenizer(llm.llm_engine.tokenizer, out.prompt_token_ids)
    return [detok.add(t) for t in out.outputs[0].token_ids] + [detok.flush()]


def test_constrained_generations_parse_and_validate(llm):
    """Named functions and "required" (parallel or not), sampled at temperature 0.8: each output
    is a finished call (or calls) whose arguments validate against the function's parameters, and
    streaming it token by token gives the same calls."""
    functions = validate_tools(TOOLS)
    runs = [("get_weather", True, "What's the weather in Paris?", 0),
            ("book_flight", True, "Book Ann, 34, a flight to Tokyo.", 2),  # $defs / $ref
            ("now", True, "What time is it?", 3),  # no parameters
            ("required", True, "Weather in Rome, and 2 plus 2?", 4),
            ("required", False, "What's the weather in Oslo?", 6)]
    prompts = [_chat(llm, text) for _, _, text, _ in runs]
    params = [SamplingParams(temperature=0.8, seed=seed, max_tokens=64, structured_outputs=StructuredOutputsParams(
        json=tool_call_schema(functions, choice, parallel))) for choice, parallel, _, seed in runs]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for (choice, parallel, _, _), out in zip(runs, outs):
        text = out.outputs[0].text
        assert out.outputs[0].finish_reason == "stop", (choice, text)
        calls = parse_constrained_tool_calls(text, choice, id_factory=call_id_factory(seed=0))
        assert calls, (choice, text)
        if choice != "required":
            assert [c.name for c in calls] == [choice]
        elif not parallel:
            assert len(calls) == 1, text
        for call in calls:
            jsonschema.validate(json.loads(call.arguments), PARAMETERS[call.name])
        parser = constrained_tool_parser(choice, id_factory=call_id_factory(seed=0))
        deltas = [d for piece in _token_pieces(llm, out) for d in parser.feed(piece)] + parser.finish()
        assert assemble(deltas) == ("", calls), (choice, text)
