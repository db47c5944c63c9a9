"""Tool calling (server/tools.py): request validation, the grammars of "required" and named choices, parsing
Hermes <tool_call> output, streaming that adds up to the parse, and the conversation given to the template."""
import itertools
import json
import random

import pytest

from pagedserve.server.protocol import OpenAIError
from pagedserve.server.tools import (DEFAULT_TOOL_PROMPT, MAX_TOOLS, ToolCallStream, ToolPlan, parse_tool_plan,
                                     required_schema, template_supports_tools)
from pagedserve.tokenizer import apply_chat_template

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["C", "F"]}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}  # no parameters: the empty object schema
TOOLS = [WEATHER, TIME]


def plan(choice="auto", parallel=None, tools=TOOLS) -> ToolPlan:
    return parse_tool_plan(tools, choice, parallel)


def ids():
    """A deterministic id factory: the stream and parse() given fresh ones make the same ids."""
    counter = itertools.count()
    return lambda: f"call_{next(counter):024x}"


def error(tools, choice=None, parallel=None) -> OpenAIError:
    with pytest.raises(OpenAIError) as e:
        parse_tool_plan(tools, choice, parallel)
    assert e.value.status == 400 and e.value.type == "invalid_request_error"
    return e.value


# --- validation -----------------------------------------------------------------------------------------------

def test_defaults_and_normalised_functions():
    p = plan(None)
    assert (p.choice, p.named, p.parallel) == ("auto", None, True)
    assert p.functions == [WEATHER["function"], {"name": "get_time", "parameters": {"type": "object", "properties": {}}}]
    assert parse_tool_plan(None, None, None) is None
    assert parse_tool_plan([], "none", None) is None  # an empty list: no tools
    assert parse_tool_plan(None, "none", False) is None
    named = plan({"type": "function", "function": {"name": "get_time"}}, parallel=False)
    assert (named.choice, named.named, named.parallel) == ("named", "get_time", False)
    assert [plan(c).choice for c in ("none", "auto", "required")] == ["none", "auto", "required"]


@pytest.mark.parametrize("tools, choice, parallel, param, message", [
    ({"type": "function"}, None, None, "tools", "tools must be a list"),
    ([{"type": "function", "function": {"name": f"f{i}"}} for i in range(MAX_TOOLS + 1)],
     None, None, "tools", "at most 128"),
    (["get_weather"], None, None, "tools[0]", "only function tools"),
    ([{"type": "custom", "function": {"name": "x"}}], None, None, "tools[0]", "only function tools"),
    ([{"type": "function", "name": "x"}], None, None, "tools[0]", "must be {'type': 'function'"),
    ([{"type": "function", "function": {}}], None, None, "tools[0].function.name", "got None"),
    ([{"type": "function", "function": {"name": "has space"}}], None, None, "tools[0].function.name",
     "1 to 64 letters"),
    ([{"type": "function", "function": {"name": "x" * 65}}], None, None, "tools[0].function.name", "1 to 64"),
    ([{"type": "function", "function": {"name": "f\n"}}], None, None, "tools[0].function.name", "'f\\n'"),
    ([TIME, WEATHER, TIME], None, None, "tools[2].function.name", "'get_time' is already the name of tools[0]"),
    ([{"type": "function", "function": {"name": "x", "description": 3}}], None, None,
     "tools[0].function.description", "must be a string"),
    ([{"type": "function", "function": {"name": "x", "parameters": {"type": "string"}}}], None, None,
     "tools[0].function.parameters", "of type 'object'"),
    ([{"type": "function", "function": {"name": "x", "parameters": "{}"}}], None, None,
     "tools[0].function.parameters", "of type 'object'"),
    (TOOLS, "always", None, "tool_choice", "tool_choice must be 'none', 'auto', 'required'"),
    (TOOLS, {"type": "function"}, None, "tool_choice", "tool_choice must be"),
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, None, "tool_choice",
     "names the function 'nope', which is not among tools"),
    (None, "auto", None, "tool_choice", "only allowed when tools are given"),
    ([], {"type": "function", "function": {"name": "get_time"}}, None, "tool_choice", "only allowed when tools"),
    (TOOLS, None, "yes", "parallel_tool_calls", "must be a boolean"),
])
def test_validation_errors(tools, choice, parallel, param, message):
    e = error(tools, choice, parallel)
    assert e.param == param
    assert message in e.message


def test_long_bad_values_are_shortened_in_messages():
    e = error([{"type": "function", "function": {"name": "x" * 10_000}}])
    assert len(e.message) < 400


def test_conflicting_defs_are_a_400_only_when_required():
    def tool(name, defs):
        return {"type": "function", "function": {"name": name, "parameters": {
            "type": "object", "properties": {"v": {"$ref": "#/$defs/V"}}, "$defs": defs}}}
    clash = [tool("a", {"V": {"type": "integer"}}), tool("b", {"V": {"type": "string"}})]
    assert error(clash, "required").param == "tools"
    assert "must be an object" in error([tool("a", ["V"])], "required").message
    assert plan("auto", tools=clash).structured_outputs() is None
    same = [tool("a", {"V": {"type": "integer"}}), tool("b", {"V": {"type": "integer"}})]
    schema = plan("required", tools=same).structured_outputs().json
    assert schema["$defs"] == {"V": {"type": "integer"}}
    assert all("$defs" not in b["properties"]["parameters"] for b in schema["items"]["anyOf"])


# --- grammars -------------------------------------------------------------------------------------------------

def test_schemas_by_choice():
    assert plan("auto").structured_outputs() is None and plan("none").structured_outputs() is None
    named = plan({"type": "function", "function": {"name": "get_weather"}}).structured_outputs()
    assert named.json == WEATHER["function"]["parameters"]
    req = plan("required").structured_outputs().json
    assert req["type"] == "array" and req["minItems"] == 1 and "maxItems" not in req
    branches = req["items"]["anyOf"]
    assert [b["properties"]["name"] for b in branches] == [{"const": "get_weather"}, {"const": "get_time"}]
    assert branches[0]["properties"]["parameters"] == WEATHER["function"]["parameters"]
    assert all(b["required"] == ["name", "parameters"] and b["additionalProperties"] is False for b in branches)
    assert plan("required", parallel=False).structured_outputs().json["maxItems"] == 1
    assert required_schema(plan().functions, True) == req


@pytest.fixture(scope="module")
def tokenizer():
    from pagedserve.model.loader import default_model_path, load_tokenizer
    return load_tokenizer(default_model_path())


@pytest.fixture(scope="module")
def compiler(tokenizer):
    xgr = pytest.importorskip("xgrammar")
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer),
                                              stop_token_ids=[tokenizer.eos_token_id])
    return xgr, xgr.GrammarCompiler(info, max_threads=1), tokenizer.eos_token_id


def accepts(compiler, schema: dict, text: str) -> bool:
    """Whether the compiled schema's grammar takes text as a whole output (then the stop token)."""
    xgr, c, eos = compiler
    matcher = xgr.GrammarMatcher(c.compile_json_schema(json.dumps(schema)))
    return matcher.accept_string(text) and matcher.accept_token(eos)


def test_schemas_compile_and_accept_exactly_the_calls(compiler):
    req = plan("required").structured_outputs().json
    one = '[{"name": "get_weather", "parameters": {"city": "Paris"}}]'
    two = '[{"name": "get_time", "parameters": {}}, {"name": "get_weather", "parameters": {"city": "Oslo", "unit": "C"}}]'
    assert accepts(compiler, req, one) and accepts(compiler, req, two)
    for bad in ("[]", '[{"name": "nope", "parameters": {}}]', '[{"name": "get_weather", "parameters": {}}]',
                '[{"name": "get_weather", "parameters": {"city": "P", "unit": "K"}}]', '{"name": "get_time"}',
                '[{"name": "get_time", "parameters": {}, "extra": 1}]'):
        assert not accepts(compiler, req, bad), bad
    single = plan("required", parallel=False).structured_outputs().json
    assert accepts(compiler, single, one) and not accepts(compiler, single, two)
    named = plan({"type": "function", "function": {"name": "get_weather"}}).structured_outputs().json
    assert accepts(compiler, named, '{"city": "Paris", "unit": "F"}')
    assert not accepts(compiler, named, '{"unit": "F"}')
    assert accepts(compiler, plan({"type": "function", "function": {"name": "get_time"}}).structured_outputs().json,
                   "{}")


def test_required_schema_with_lifted_defs_compiles(compiler):
    tool = {"type": "function", "function": {"name": "a", "parameters": {
        "type": "object", "properties": {"v": {"$ref": "#/$defs/V"}}, "required": ["v"],
        "$defs": {"V": {"type": "integer"}}}}}
    req = plan("required", tools=[tool]).structured_outputs().json
    assert accepts(compiler, req, '[{"name": "a", "parameters": {"v": 3}}]')
    assert not accepts(compiler, req, '[{"name": "a", "parameters": {"v": "3"}}]')
    # draft-7 "definitions" move up the same way
    draft7 = {"type": "function", "function": {"name": "b", "parameters": {
        "type": "object", "properties": {"w": {"$ref": "#/definitions/W"}}, "required": ["w"],
        "definitions": {"W": {"type": "boolean"}}}}}
    req = plan("required", tools=[draft7]).structured_outputs().json
    assert req["definitions"] == {"W": {"type": "boolean"}}
    assert accepts(compiler, req, '[{"name": "b", "parameters": {"w": true}}]')
    assert not accepts(compiler, req, '[{"name": "b", "parameters": {"w": 1}}]')


def test_a_root_reference_cannot_be_nested():
    tool = {"type": "function", "function": {"name": "tree", "parameters": {
        "type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#"}}}}}}
    assert plan("auto", tools=[tool]) is not None  # free text: nothing nests it
    with pytest.raises(OpenAIError, match="refer to their root"):
        plan("required", tools=[tool]).structured_outputs()


# --- parsing --------------------------------------------------------------------------------------------------

def call(name, arguments, id_):
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": arguments}}


def block(name, arguments) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


def test_parse_auto():
    p = plan()
    assert p.parse("Just text.", ids()) == ("Just text.", [])
    assert p.parse(block("get_time", "{}"), ids()) == (None, [call("get_time", "{}", f"call_{0:024x}")])
    text = "Let me check.\n" + block("get_weather", '{"city":"Paris"}') + "\n" + block("get_time", "{}") + "\nDone."
    content, calls = p.parse(text, ids())
    assert content == "Let me check.\n\n\nDone."
    assert [c["function"] for c in calls] == [{"name": "get_weather", "arguments": '{"city": "Paris"}'},
                                              {"name": "get_time", "arguments": "{}"}]
    assert [c["id"] for c in calls] == [f"call_{0:024x}", f"call_{1:024x}"]
    # only whitespace around the calls: no content
    assert p.parse("\n" + block("get_time", "{}") + " \n", ids())[0] is None
    # arguments may be left out; non-ASCII is kept as written
    assert p.parse('<tool_call>{"name": "get_time"}</tool_call>', ids())[1][0]["function"]["arguments"] == "{}"
    assert p.parse(block("get_weather", '{"city": "Zürich"}'), ids())[1][0]["function"]["arguments"] == \
        '{"city": "Zürich"}'


@pytest.mark.parametrize("bad", [
    block("get_weather", '{"city": "Paris"'),       # broken JSON
    block("send_email", '{"to": "x"}'),             # unknown function
    block("get_weather", '"Paris"'),                # arguments not an object
    block("get_weather", '{"x": NaN}'),             # not strict JSON
    '<tool_call>{"name": ["get_time"]}</tool_call>',  # a name that is no string
    "<tool_call>[1, 2]</tool_call>",
    "<tool_call>\n" + block("get_time", "{}"),      # a block ends at the first </tool_call>
    block("get_time", "{}")[:-1],                   # unterminated
])
def test_parse_auto_keeps_bad_blocks_as_text(bad):
    assert plan().parse("A " + bad + " B", ids()) == ("A " + bad + " B", [])


def test_parse_auto_not_parallel_keeps_the_first_call():
    text = "x" + block("get_time", "{}") + block("get_weather", '{"city": "P"}') + "y"
    content, calls = plan(parallel=False).parse(text, ids())
    assert content == "xy" and [c["function"]["name"] for c in calls] == ["get_time"]


def test_parse_required_named_none():
    req = plan("required")
    text = '[{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "get_time", "parameters": {}}]'
    assert req.parse(text, ids()) == (None, [call("get_weather", '{"city": "Paris"}', f"call_{0:024x}"),
                                             call("get_time", "{}", f"call_{1:024x}")])
    assert req.parse('[{"name": "get_weather", "parameters": {"ci', ids()) == (
        '[{"name": "get_weather", "parameters": {"ci', [])  # cut short by max_tokens: text, no call
    assert req.parse("", ids()) == (None, [])
    assert req.parse('[{"name": {}, "parameters": {}}]', ids()) == ('[{"name": {}, "parameters": {}}]', [])
    assert len(plan("required", parallel=False).parse(text, ids())[1]) == 1
    named = plan({"type": "function", "function": {"name": "get_weather"}})
    assert named.parse('{"city": "Rome"}', ids()) == (None, [call("get_weather", '{"city": "Rome"}', f"call_{0:024x}")])
    assert plan("none").parse(block("get_time", "{}"), ids()) == (block("get_time", "{}"), [])


def test_real_ids_look_like_openais():
    calls = plan().parse(block("get_time", "{}") * 2)[1]
    assert all(c["id"].startswith("call_") and len(c["id"]) == 29 and int(c["id"][5:], 16) >= 0 for c in calls)
    assert calls[0]["id"] != calls[1]["id"]


# --- streaming ------------------------------------------------------------------------------------------------

def reassemble(deltas: list[dict]) -> tuple[str | None, list[dict]]:
    """The client's view: content concatenated; tool calls by index, arguments concatenated."""
    content, calls = "", {}
    for d in deltas:
        assert set(d) <= {"content", "tool_calls"} and d
        content += d.get("content", "")
        for tc in d.get("tool_calls", []):
            c = calls.setdefault(tc["index"], {"function": {"arguments": ""}})
            assert ("id" in tc) == ("id" not in c)  # the id comes once, first
            c.update({k: tc[k] for k in ("id", "type") if k in tc})
            c["function"]["name"] = tc["function"].get("name", c["function"].get("name"))
            c["function"]["arguments"] += tc["function"].get("arguments", "")
    assert sorted(calls) == list(range(len(calls)))
    return content or None, [{"id": calls[i]["id"], "type": calls[i]["type"],
                              "function": {"name": calls[i]["function"]["name"],
                                           "arguments": calls[i]["function"]["arguments"]}} for i in sorted(calls)]


def stream(p: ToolPlan, pieces: list[str]) -> list[dict]:
    s = ToolCallStream(p, ids())
    return [d for piece in pieces for d in s.feed(piece)] + s.finish()


def random_splits(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 12)))) if len(text) > 1 else []
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


AUTO_TEXTS = [
    "", "   ", "plain text with < and <tool and <tool_cal but no call", "ends with a partial tag <tool_c",
    block("get_time", "{}"),
    "Sure!\n" + block("get_weather", '{"city": "Paris", "unit": "C"}') + "\n" + block("get_time", "{}"),
    "\n " + block("get_time", "{}") + "\n\n" + block("get_weather", '{"city": "Ünïcode 😀"}') + "\n",
    "A " + block("get_weather", '{"city": "Paris"') + " broken, then " + block("get_time", "{}") + " after",
    "x " + block("send_email", "{}") + " unknown " + "<tool_call>\n" + block("get_time", "{}") + " tail",
    "open at the end " + block("get_time", "{}")[:-3], "<<tool_call><tool_call></tool_call>",
    "before" + block("get_time", "{}") + "</tool_call> stray end",
]


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("text", AUTO_TEXTS)
def test_auto_stream_reassembles_to_parse(text, parallel):
    p, rng = plan(parallel=parallel), random.Random(text)
    expected = p.parse(text, ids())
    for pieces in [[text], list(text)] + [random_splits(text, rng) for _ in range(40)]:
        assert reassemble(stream(p, pieces)) == expected, pieces


FRAGMENTS = ["<tool_call>", "</tool_call>", "<", "<tool_", "call>", "</", " ", "\n", "hi", "\u00e9\U0001f600",
             '{"name": "get_time"}', '{"name": "get_weather", "arguments": {"city": "P"}}', '{"name": "x"}', "{",
             block("get_time", "{}"), block("get_weather", '{"city": "Oslo"}')]


@pytest.mark.parametrize("parallel", [True, False])
def test_auto_stream_reassembles_to_parse_on_random_texts(parallel):
    p, rng = plan(parallel=parallel), random.Random(7)
    for _ in range(400):
        text = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 10)))
        assert reassemble(stream(p, random_splits(text, rng))) == p.parse(text, ids()), text


def test_auto_stream_sends_text_early_and_each_call_when_it_ends():
    s = ToolCallStream(plan(), ids())
    assert s.feed("Hello <") == [{"content": "Hello "}]      # only the possible tag start is held
    assert s.feed("b>") == [{"content": "<b>"}]
    assert s.feed(" <tool_call>\n{\"name\": \"get_time\", ") == [{"content": " "}]
    assert s.feed('"arguments": {}}\n</tool_call') == []
    assert s.feed(">\nbye") == [{"tool_calls": [{"index": 0, "id": f"call_{0:024x}", "type": "function",
                                                 "function": {"name": "get_time", "arguments": "{}"}}]},
                                {"content": "\nbye"}]
    assert s.finish() == []


def test_auto_stream_holds_leading_whitespace_until_text():
    s = ToolCallStream(plan(), ids())
    assert s.feed("\n\n") == [] and s.feed(" ok") == [{"content": "\n\n ok"}] and s.feed(" ") == [{"content": " "}]


def test_named_stream():
    p = plan({"type": "function", "function": {"name": "get_weather"}})
    s = ToolCallStream(p, ids())
    header = {"tool_calls": [{"index": 0, "id": f"call_{0:024x}", "type": "function",
                              "function": {"name": "get_weather", "arguments": ""}}]}
    assert s.feed('{"ci') == [header, {"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}]
    assert s.feed('ty": "Rome"}') == [{"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Rome"}'}}]}]
    assert s.finish() == []
    empty = ToolCallStream(p, ids())
    assert empty.feed("") == [header] and empty.finish() == []
    assert ToolCallStream(p, ids()).finish() == [header]
    rng = random.Random(0)
    for text in ['{"city": "Rome"}', "", '{"city": "Zürich", "unit": "C"}']:
        for _ in range(20):
            assert reassemble(stream(p, random_splits(text, rng))) == p.parse(text, ids())


NOTE = {"type": "function", "function": {"name": "save_note", "parameters": {"type": "object", "properties": {
    "text": {"type": "string"}, "tags": {"type": "array"}, "meta": {"type": "object"}}}}}
REQUIRED_TOOLS = TOOLS + [NOTE]
TRICKY = {"text": 'braces } { ] [ , quotes " \' and a backslash \\ then \\" and "name": "get_time", "parameters": {',
          "tags": ["[", "]", "{", "}", "", "\\", "tab\there\nnewline", "Zürich 😀"],
          "meta": {"deep": {"deeper": [1, -2.5e3, True, False, None, {"": {}}, [[], [{}]]]}, "end": "C:\\dir\\"}}
CALLS = [("get_weather", {"city": "Paris", "unit": "C"}), ("save_note", TRICKY), ("get_time", {})]


def spaced(value, ws) -> str:
    """value as JSON with ws() (some JSON whitespace) between every two tokens, as the grammar allows."""
    if isinstance(value, dict):
        inner = [ws() + json.dumps(k) + ws() + ":" + ws() + spaced(v, ws) + ws() for k, v in value.items()]
    elif isinstance(value, list):
        inner = [ws() + spaced(v, ws) + ws() for v in value]
    else:
        return json.dumps(value, ensure_ascii=False)
    opening, closing = "{}" if isinstance(value, dict) else "[]"
    return opening + (",".join(inner) or ws()) + closing


def required_text(calls, ws) -> str:
    return ws() + spaced([{"name": n, "parameters": a} for n, a in calls], ws) + ws()


def whitespace(seed):
    rng = random.Random(seed)
    return lambda: rng.choice(["", " ", "\n", "  ", "\n  \t", "\r\n"] + [" " * 8] * (seed % 2))


REQUIRED_CASES = [(calls, required_text(calls, ws)) for calls in (CALLS[:1], CALLS[1:2], CALLS)
                  for ws in (lambda: "", lambda: " ", lambda: "\n", whitespace(1), whitespace(2), whitespace(3))]
REQUIRED_TEXTS = [text for _, text in REQUIRED_CASES]


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("given, text", REQUIRED_CASES)
def test_required_stream_reassembles_to_parse(given, text, parallel):
    p, rng = plan("required", parallel, REQUIRED_TOOLS), random.Random(text)
    expected = p.parse(text, ids())
    content, calls = expected
    assert content is None and [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        (given if parallel else given[:1])
    # the arguments are the parameters' text as written: from its "{" to its "}", whitespace inside kept
    assert all(c["function"]["arguments"] in text and c["function"]["arguments"][::len(c["function"]["arguments"]) - 1]
               == "{}" for c in calls)
    for pieces in [[text], list(text)] + [random_splits(text, rng) for _ in range(60)]:
        assert reassemble(stream(p, pieces)) == expected, pieces


def test_parse_required_keeps_the_arguments_as_written():
    text = '\n[ {"name" :"get_weather" ,\n "parameters": { "city" : "Paris\\"}" }\n } ]\n'
    assert plan("required").parse(text, ids()) == (None, [call("get_weather", '{ "city" : "Paris\\"}" }',
                                                               f"call_{0:024x}")])


@pytest.mark.parametrize("text", [
    "", "  \n", "not json", '[{"name": {}, "parameters": {}}]', '[{"name": "nope", "parameters": {"a": 1}}]',
    '{"name": "get_time", "parameters": {}}', '[["name", "get_time", "parameters", {}]]',
    '[{"parameters": {}, "name": "get_time"}]', '[{"name": "get_time", "x": 1, "parameters": {}}]', "[]",
    '[{"name": "get_time"', '[{"name": "get_time", "parameters": ',
])
def test_required_stream_without_a_call_sends_the_text_as_parse_does(text):
    p, rng = plan("required"), random.Random(text)
    for pieces in [[text], list(text)] + [random_splits(text, rng) for _ in range(10)]:
        s = ToolCallStream(p, ids())
        deltas = [d for piece in pieces for d in s.feed(piece)]
        assert deltas == [] and reassemble(deltas + s.finish()) == p.parse(text, ids()) and not s.made_calls


def test_required_stream_sends_each_call_as_its_parameters_begin():
    s = ToolCallStream(plan("required"), ids())
    header = lambda i, name: {"tool_calls": [{"index": i, "id": f"call_{i:024x}", "type": "function",  # noqa: E731
                                              "function": {"name": name, "arguments": ""}}]}
    args = lambda i, text: {"tool_calls": [{"index": i, "function": {"arguments": text}}]}  # noqa: E731
    assert s.feed('[ {"name": "get_time", "parameters": ') == [] and not s.made_calls
    assert s.feed("{") == [header(0, "get_time"), args(0, "{")] and s.made_calls
    assert s.feed(' } } ,\n{"name":"get_weather","parameters":{"ci') == [
        args(0, " }"), header(1, "get_weather"), args(1, '{"ci')]
    assert s.feed('ty": "}]"}') == [args(1, 'ty": "}]"}')]
    assert s.feed("\n}\n]\n") == [] and s.finish() == []
    # char by char: every call (header and whole arguments) is out before the closing "]" is fed
    text = REQUIRED_TEXTS[-1]
    p = plan("required", tools=REQUIRED_TOOLS)
    s, deltas = ToolCallStream(p, ids()), []
    end = text.rindex("]")
    for ch in text[:end]:
        deltas += s.feed(ch)
    assert reassemble(deltas) == p.parse(text, ids())
    assert s.feed(text[end:]) == [] and s.finish() == []


def test_required_stream_cut_short_shows_the_calls_begun():
    p, text = plan("required", tools=REQUIRED_TOOLS), REQUIRED_TEXTS[-1]
    _, full = p.parse(text, ids())
    rng = random.Random(5)
    for cut in range(len(text)):
        prefix = text[:cut]
        content, calls = reassemble(stream(p, random_splits(prefix, rng)))
        if p.parse(prefix, ids())[1]:  # only whitespace cut off: the whole calls
            assert (content, calls) == (None, full) and not text[cut:].strip(" \t\n\r]")
        elif calls:  # parse() gives the text and no call; the stream has sent the calls begun so far
            assert content is None and calls[:-1] == full[:len(calls) - 1]
            assert {**calls[-1], "function": full[len(calls) - 1]["function"]} == full[len(calls) - 1]
            assert full[len(calls) - 1]["function"]["arguments"].startswith(calls[-1]["function"]["arguments"])
        else:
            assert (content, calls) == p.parse(prefix, ids())
    s = ToolCallStream(p, ids())
    s.feed(text[:text.index('"parameters"') + 20])
    assert s.made_calls and s.finish() == []


def test_none_stream():
    none, rng = plan("none"), random.Random(1)
    t = "A " + block("get_time", "{}")
    assert reassemble(stream(none, random_splits(t, rng))) == (t, [])


# --- conversation ---------------------------------------------------------------------------------------------

HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris, and the time?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": "14:05"},
]


def test_template_supports_tools(tokenizer):
    class Fake:
        chat_template = "{% if tools %}{{ tools | tojson }}{% endif %}"
    assert not template_supports_tools(tokenizer)  # SmolLM2-135M's template: role and content only
    assert template_supports_tools(Fake())
    Fake.chat_template = {"default": "{{ messages }}", "tool_use": "{% for t in tools %}{% endfor %}"}
    assert template_supports_tools(Fake())
    Fake.chat_template = "{{ my_toolset }}"
    assert not template_supports_tools(Fake())


def test_default_prompt_rendering():
    msgs, kwargs = plan().conversation(HISTORY, template_supports_tools=False)
    assert kwargs == {}
    assert all(set(m) == {"role", "content"} for m in msgs)
    tools_json = "\n".join(json.dumps({"type": "function", "function": f}, ensure_ascii=False)
                           for f in plan().functions)
    assert msgs[0] == {"role": "system",
                       "content": "Be brief.\n\n" + DEFAULT_TOOL_PROMPT.replace("{tools}", tools_json)}
    assert msgs[2] == {"role": "assistant", "content":
                       '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
                       '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'}
    assert msgs[3] == {"role": "user", "content": "<tool_response>\n18 C, sunny\n</tool_response>\n"
                                                  "<tool_response>\n14:05\n</tool_response>"}
    assert len(msgs) == 4
    assert HISTORY[2]["content"] is None and HISTORY[0]["content"] == "Be brief."  # the input is not changed
    # no system message: one is added; content next to calls comes first
    msgs, _ = plan().conversation([{"role": "user", "content": "hi"},
                                   {"role": "assistant", "content": "Checking.", "tool_calls": HISTORY[2]["tool_calls"][1:]}],
                                  False)
    assert msgs[0]["role"] == "system" and msgs[0]["content"].startswith("# Tools\n")
    assert msgs[2]["content"] == 'Checking.\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    # "none": the tools are not shown, the history still is
    msgs, kwargs = plan("none").conversation(HISTORY, False)
    assert kwargs == {} and msgs[0] == {"role": "system", "content": "Be brief."} and "<tool_call>" in msgs[2]["content"]


def test_default_prompt_through_the_real_template(tokenizer):
    msgs, kwargs = plan().conversation(HISTORY, template_supports_tools(tokenizer))
    prompt = tokenizer.decode(apply_chat_template(tokenizer, msgs, **kwargs))
    assert json.dumps(WEATHER, ensure_ascii=False) in prompt and "<tools>\n" in prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert "<|im_start|>user\n<tool_response>\n18 C, sunny\n</tool_response>" in prompt
    assert prompt.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert prompt.endswith("<|im_start|>assistant\n")


def test_tool_template_gets_tools_and_structured_history(tokenizer):
    msgs, kwargs = plan().conversation(HISTORY, template_supports_tools=True)
    assert kwargs == {"tools": TOOLS[:1] + [{"type": "function", "function": plan().functions[1]}]}
    assert msgs[3] == HISTORY[3] and msgs[0] == HISTORY[0]
    # earlier calls' arguments become objects, as templates expect (the request's messages are untouched)
    assert [c["function"]["arguments"] for c in msgs[2]["tool_calls"]] == [{"city": "Paris"}, {}]
    assert HISTORY[2]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'
    assert plan("none").conversation(HISTORY, True)[1] == {}
    # a Jinja template that renders tools receives them through the project's apply_chat_template
    template = ("{% for t in tools %}TOOL {{ t.function.name }}|{% endfor %}{% for m in messages %}"
                "{{ m.role }}: {{ m.content }}{% for c in m.tool_calls or [] %}CALL {{ c.function.name }}"
                "{{ c.function.arguments | tojson }}{% endfor %}|{% endfor %}")
    text = tokenizer.decode(apply_chat_template(tokenizer, msgs, add_generation_prompt=False,
                                                chat_template=template, **kwargs))
    assert text.startswith("TOOL get_weather|TOOL get_time|system: Be brief.|")
    assert 'CALL get_weather{"city": "Paris"}CALL get_time{}|tool: 18 C, sunny|' in text


@pytest.mark.parametrize("template_tools", [True, False])
def test_malformed_history_call_is_a_400(template_tools):
    bad = [{"role": "assistant", "content": "", "tool_calls": [{"id": "c", "type": "function", "function": {}}]}]
    with pytest.raises(OpenAIError) as e:
        plan().conversation(bad, template_tools)
    assert e.value.status == 400 and e.value.param == "messages" and "tool_calls entry" in e.value.message
    # arguments that are not JSON text are passed on as they are
    odd = [{"role": "assistant", "tool_calls": [{"function": {"name": "get_time", "arguments": "not json"}}]}]
    assert '"arguments": "not json"' in plan().conversation(odd, False)[0][1]["content"]
