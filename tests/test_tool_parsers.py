"""Tool-call parsers on canned model outputs: the whole-output result of each format (several calls,
text around them, malformed JSON, unicode), and streams split at every chunk boundary (and at
random ones) that add up to exactly that result; the JSON scanner against json.loads."""

import json
import random

import pytest

from forge.tools import (
    ContentDelta,
    ToolCallDelta,
    assemble,
    call_id_factory,
    detect_tool_parser,
    get_tool_parser,
)
from forge.tools.json_scan import JsonScanner
from forge.tools.tool_parsers import HermesToolParser, Llama3JsonToolParser, MistralToolParser

W = '{"city": "Paris", "unit": "celsius"}'
T = '{"tz": "Asia/Tokyo"}'

# (parser, output text, expected content, expected [(name, arguments)])
CASES = [
    # --- hermes (Hermes 2/3, Qwen2.5, Qwen3) ---
    ("hermes", f'<tool_call>\n{{"name": "get_weather", "arguments": {W}}}\n</tool_call>', "", [("get_weather", W)]),
    ("hermes", f'I will check both.\n<tool_call>\n{{"name": "get_weather", "arguments": {W}}}\n</tool_call>\n'
               f'<tool_call>\n{{"name": "get_time", "arguments": {T}}}\n</tool_call>',
     "I will check both.", [("get_weather", W), ("get_time", T)]),
    ("hermes", f'<tool_call>{{"name": "get_time", "arguments": {T}}}</tool_call>\n\nDone, asked.  ',
     "Done, asked.  ", [("get_time", T)]),
    ("hermes", '<tool_call>\n{"name": "translate", "arguments": {"text": "東京 😀 \\u00e9\\"q\\"", "to": "fr"}}\n</tool_call>',
     "", [("translate", '{"text": "東京 😀 \\u00e9\\"q\\"", "to": "fr"}')]),
    # name after the arguments, "parameters", no arguments at all, arguments quoted as a string
    ("hermes", f'<tool_call>{{"arguments": {T}, "name": "get_time"}}</tool_call>', "", [("get_time", T)]),
    ("hermes", f'<tool_call>{{"name": "get_time", "parameters": {T}}}</tool_call>', "", [("get_time", T)]),
    ("hermes", '<tool_call>{"name": "now"}</tool_call>', "", [("now", "{}")]),
    ("hermes", '<tool_call>{"name": "now", "arguments": "{\\"tz\\": \\"UTC\\"}"}</tool_call>', "",
     [("now", '{"tz": "UTC"}')]),
    # two objects in one block; a missing </tool_call> at the end; the outer "}" forgotten
    ("hermes", f'<tool_call>\n{{"name": "a", "arguments": {{}}}}\n{{"name": "b", "arguments": {T}}}\n</tool_call>', "",
     [("a", "{}"), ("b", T)]),
    ("hermes", f'Sure.<tool_call>\n{{"name": "get_time", "arguments": {T}}}', "Sure.", [("get_time", T)]),
    ("hermes", f'<tool_call>\n{{"name": "get_time", "arguments": {T}\n</tool_call>', "", [("get_time", T)]),
    # malformed before the call is committed: all content
    ("hermes", '<tool_call>\n{"name": get_weather}\n</tool_call>', '<tool_call>\n{"name": get_weather}\n</tool_call>', []),
    ("hermes", '<tool_call>{"function": "f", "arguments": {}}</tool_call>',
     '<tool_call>{"function": "f", "arguments": {}}</tool_call>', []),
    ("hermes", '<tool_call>{"name": 5, "arguments": {}}</tool_call> ok', '<tool_call>{"name": 5, "arguments": {}}</tool_call> ok', []),
    ("hermes", "Put calls in a <tool_call> tag, like <tool_call>this</tool_call>.",
     "Put calls in a <tool_call> tag, like <tool_call>this</tool_call>.", []),
    ("hermes", "Hello <tool", "Hello <tool", []),
    ("hermes", "<tool_call>\n", "<tool_call>\n", []),
    ("hermes", '<tool_call>\n{"name": "get_weather", "argu', '<tool_call>\n{"name": "get_weather", "argu', []),
    # a malformed call after a good one: the good one stays
    ("hermes", f'<tool_call>{{"name": "a", "arguments": {T}}}</tool_call>\n<tool_call>oops</tool_call>',
     "<tool_call>oops</tool_call>", [("a", T)]),
    # committed, then broken: the call keeps the arguments sent so far, the rest is content
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par', "", [("get_weather", '{"city": "Par')]),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"a": tru}}</tool_call>', "}}</tool_call>", [("f", '{"a": tru')]),
    ("hermes", '<tool_call>{"name": "a", "arguments": {}}</tool_ca', "</tool_ca", [("a", "{}")]),
    ("hermes", "  Just text, no tools.\n", "  Just text, no tools.\n", []),
    ("hermes", "", "", []),

    # --- llama3_json (Llama 3.1 / 3.2 / 3.3) ---
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}}', "", [("get_weather", '{"city": "Paris"}')]),
    ("llama3_json", f'<|python_tag|>{{"name": "get_time", "parameters": {T}}}', "", [("get_time", T)]),
    ("llama3_json", f' \n{{"type": "function", "name": "get_weather", "parameters": {W}}}; {{"name": "get_time", "parameters": {T}}}',
     "", [("get_weather", W), ("get_time", T)]),
    ("llama3_json", f'Let me look.\n<|python_tag|>{{"name": "get_time", "parameters": {T}}}', "Let me look.", [("get_time", T)]),
    ("llama3_json", '{"answer": 42, "name": "x"}', '{"answer": 42, "name": "x"}', []),
    ("llama3_json", '  {"name": "f", "parameters": [1, 2]}', '  {"name": "f", "parameters": [1, 2]}', []),
    ("llama3_json", '<|python_tag|>brave_search.call(query="weather")', '<|python_tag|>brave_search.call(query="weather")', []),
    ("llama3_json", 'The JSON is {"name": "f", "parameters": {}}', 'The JSON is {"name": "f", "parameters": {}}', []),
    ("llama3_json", f'{{"name": "get_time", "parameters": {T}}}\nThat is all.', "That is all.", [("get_time", T)]),
    ("llama3_json", '{"name": "résumé", "parameters": {"q": "naïve ☃"}}', "", [("résumé", '{"q": "naïve ☃"}')]),

    # --- mistral ---
    ("mistral", f'[TOOL_CALLS][{{"name": "get_weather", "arguments": {W}}}]', "", [("get_weather", W)]),
    ("mistral", f'Checking. [TOOL_CALLS] [{{"name": "get_weather", "arguments": {W}}}, {{"name": "get_time", "arguments": {T}, "id": "abc123XYZ"}}]',
     "Checking.", [("get_weather", W), ("get_time", T)]),
    ("mistral", f'[TOOL_CALLS]get_weather[ARGS]{W}', "", [("get_weather", W)]),
    ("mistral", f'[TOOL_CALLS]get_weather[ARGS]{W}[TOOL_CALLS]get_time[ARGS]{T}', "", [("get_weather", W), ("get_time", T)]),
    ("mistral", "[TOOL_CALLS] not json here", "[TOOL_CALLS] not json here", []),
    ("mistral", "[TOOL_CALLS]get_weather(city=Paris)", "[TOOL_CALLS]get_weather(city=Paris)", []),
    ("mistral", '[TOOL_CALLS][{"name": "a", "arguments": {}}, oops]', ", oops]", [("a", "{}")]),
    ("mistral", '[TOOL_CALLS][{"name": "a", "arguments": {"t": "日本語"}}]\nsee above', "see above", [("a", '{"t": "日本語"}')]),
    ("mistral", "No tools [TOOL_CA", "No tools [TOOL_CA", []),
]


def _parser(name, seed=7):
    return get_tool_parser(name, id_factory=call_id_factory(seed=seed))


def _stream(name, pieces):
    parser = _parser(name)
    deltas = []
    for piece in pieces:
        deltas += parser.feed(piece)
    return deltas + parser.finish()


def _check_delta_shape(deltas):
    """OpenAI's streaming shape: each call's first delta has its index, id and name; later ones only
    arguments; calls come in index order, one after another."""
    started = []
    for d in deltas:
        if isinstance(d, ToolCallDelta):
            if d.id is not None:
                assert d.name and d.index == len(started), d
                started.append(d.index)
            else:
                assert d.name is None and started and d.index == started[-1], d
            chunk = d.to_openai()["tool_calls"][0]
            assert chunk["index"] == d.index and ("id" in chunk) == (d.id is not None)
        else:
            assert isinstance(d, ContentDelta) and d.text
            assert d.to_openai() == {"content": d.text}


@pytest.mark.parametrize("name,text,content,calls", CASES)
def test_extract(name, text, content, calls):
    got_content, got_calls = _parser(name).extract(text)
    assert got_content == content
    assert [(c.name, c.arguments) for c in got_calls] == calls
    ids = call_id_factory(seed=7)
    assert [c.id for c in got_calls] == [ids() for _ in calls]
    for c in got_calls:
        assert c.to_openai() == {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}


@pytest.mark.parametrize("name,text,content,calls", CASES)
def test_stream_equals_extract_at_every_split(name, text, content, calls):
    expected = _parser(name).extract(text)
    whole = _stream(name, [text])
    _check_delta_shape(whole)
    assert assemble(whole) == expected
    for cut in range(len(text) + 1):
        deltas = _stream(name, [text[:cut], text[cut:]])
        _check_delta_shape(deltas)
        assert assemble(deltas) == expected, cut
    one_by_one = _stream(name, list(text))
    _check_delta_shape(one_by_one)
    assert assemble(one_by_one) == expected
    rng = random.Random(len(text))
    for _ in range(20):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(2, 8))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        deltas = _stream(name, pieces)
        _check_delta_shape(deltas)
        assert assemble(deltas) == expected, pieces


@pytest.mark.parametrize("name", ["hermes", "llama3_json", "mistral"])
def test_corrupted_outputs_never_raise_and_stream_equals_extract(name):
    """Every canned output of the format, corrupted at random (characters of markers and JSON
    deleted, inserted, replaced): parsing never raises, and streams split at random points add up
    to the whole-output result."""
    rng = random.Random(name)
    alphabet = list('{}[]",:; \n\\') + ["<tool_call>", "</tool_call>", "[TOOL_CALLS]", "[ARGS]", "<|python_tag|>",
                                           '"name": "f"', '"arguments": ', "é", "😀"]
    texts = [text for parser, text, *_ in CASES if parser == name]
    for _ in range(150):
        chars = list(rng.choice(texts))
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(chars) + 1)
            op = rng.randrange(3)
            if op == 0 and chars:
                del chars[min(at, len(chars) - 1)]
            elif op == 1:
                chars.insert(at, rng.choice(alphabet))
            elif chars:
                chars[min(at, len(chars) - 1)] = rng.choice(alphabet)
        text = "".join(chars)
        expected = _parser(name).extract(text)
        for _ in range(4):
            cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(1, 6))))
            deltas = _stream(name, [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])])
            _check_delta_shape(deltas)
            assert assemble(deltas) == expected, text


def test_arguments_stream_before_the_call_ends():
    """Argument text goes out as it arrives (not held until the call closes), and a half-written
    marker is held back, never sent as content."""
    parser = _parser("hermes")
    assert parser.feed("Hi <tool_") == [ContentDelta("Hi")]
    assert parser.feed('call>\n{"name": "get_weather", "argu') == []
    first = parser.feed('ments": {"city": "Pa')
    assert first == [ToolCallDelta(0, call_id_factory(seed=7)(), "get_weather", '{"city": "Pa')]
    assert parser.feed('ris"}') == [ToolCallDelta(0, arguments='ris"}')]
    assert parser.feed("}\n</tool_call>") == []
    assert parser.finish() == []


def test_chunk_with_everything_merges_deltas():
    deltas = _stream("mistral", [f'Hi [TOOL_CALLS][{{"name": "a", "arguments": {T}}}, {{"name": "b", "arguments": {{}}}}]'])
    assert [type(d).__name__ for d in deltas] == ["ContentDelta", "ToolCallDelta", "ToolCallDelta"]
    assert deltas[1].arguments == T and deltas[2].arguments == "{}"


def test_mistral_ids_fit_mistral_templates():
    _, calls = MistralToolParser().extract(f'[TOOL_CALLS][{{"name": "a", "arguments": {T}}}, {{"name": "b", "arguments": {{}}}}]')
    assert len(calls) == 2 and calls[0].id != calls[1].id
    assert all(len(c.id) == 9 and c.id.isalnum() for c in calls)
    _, calls = HermesToolParser().extract('<tool_call>{"name": "a", "arguments": {}}</tool_call>')
    assert calls[0].id.startswith("call_") and len(calls[0].id) == 29


def test_seeded_ids_repeat_and_unseeded_differ():
    assert call_id_factory(seed=3)() == call_id_factory(seed=3)()
    assert call_id_factory()() != call_id_factory()()
    with pytest.raises(ValueError, match="id style"):
        call_id_factory(style="uuid")


def test_feed_after_finish_and_unknown_parser():
    parser = _parser("hermes")
    parser.finish()
    with pytest.raises(RuntimeError, match="after finish"):
        parser.feed("x")
    with pytest.raises(ValueError, match="hermes, llama3_json, mistral"):
        get_tool_parser("pythonic")


def test_detect_tool_parser():
    qwen = ('{%- if tools %}<tools>{% for tool in tools %}{{ tool | tojson }}{% endfor %}</tools> '
            'return a json object within <tool_call></tool_call> XML tags{%- endif %}')
    assert detect_tool_parser(qwen) == "hermes"
    assert detect_tool_parser("{{- '[AVAILABLE_TOOLS]' }}{%- if message.tool_calls %}[TOOL_CALLS]{% endif %}") == "mistral"
    assert detect_tool_parser("{%- if message.role == 'ipython' %}<|start_header_id|>ipython{% endif %}") == "llama3_json"
    assert detect_tool_parser("{{ '<|python_tag|>' + tool_call.name }}") == "llama3_json"
    assert detect_tool_parser("<tool_call>\n<function={{ tool_call.name }}>") is None  # Qwen3-Coder: XML calls
    assert detect_tool_parser("{% if message.role == 'ipython' %}<|python_start|>{% endif %}") is None  # Llama 4
    assert detect_tool_parser("{{ message.content }}") is None
    assert detect_tool_parser(None) is None
    assert set(map(type, map(_parser, ["hermes", "llama3_json", "mistral"]))) == {
        HermesToolParser, Llama3JsonToolParser, MistralToolParser}


def _random_json(rng, depth=0):
    kind = rng.randrange(7 if depth < 3 else 4)
    if kind == 0:
        return rng.choice([0, -1, 12, 3.5, -0.25, 1e10, 2.5e-3, 10**20])
    if kind == 1:
        return rng.choice(["", "a", 'q"uote', "back\\slash", "é✓😀", "\n\t", "\u0001"])
    if kind == 2:
        return rng.choice([True, False, None])
    if kind == 3:
        return rng.randrange(100)
    if kind in (4, 5):
        return {rng.choice("abcde") + str(i): _random_json(rng, depth + 1) for i in range(rng.randrange(4))}
    return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]


def _loads_strict(text):
    def reject(_):
        raise ValueError
    try:
        json.loads(text, parse_constant=reject)  # no NaN / Infinity, as RFC 8259
        return True
    except ValueError:
        return False


def test_json_scanner_agrees_with_json_loads():
    """Random JSON, half of it mutated (a character deleted, inserted or replaced): the scanner
    accepts exactly what json.loads accepts, and feeding it in pieces records the same events."""
    rng = random.Random(0)
    alphabet = list('{}[]",:0123456789-+.eEtrufalsn \\u\n')
    accepted = 0
    for _ in range(3000):
        text = json.dumps(_random_json(rng), ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 1]))
        if rng.random() < 0.5:
            chars = list(text)
            for _ in range(rng.randint(1, 2)):
                at = rng.randrange(len(chars) + 1)
                op = rng.randrange(3)
                if op == 0 and chars:
                    del chars[min(at, len(chars) - 1)]
                elif op == 1:
                    chars.insert(at, rng.choice(alphabet))
                elif chars:
                    chars[min(at, len(chars) - 1)] = rng.choice(alphabet)
            text = "".join(chars)
        whole = JsonScanner()
        stop = whole.feed(text)
        whole.finish()
        ok = whole.done and not text[stop:].strip(" \t\n\r")
        assert ok == _loads_strict(text), text
        accepted += ok
        if ok:
            pieces = JsonScanner()
            cuts = sorted(rng.sample(range(len(text) + 1), min(3, len(text) + 1)))
            for a, b in zip([0, *cuts], [*cuts, len(text)]):
                pieces.feed(text[a:b])
            pieces.finish()
            assert pieces.events == whole.events and pieces.done
    assert 1000 < accepted < 3000  # both kinds were exercised
