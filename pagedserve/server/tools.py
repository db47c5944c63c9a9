"""OpenAI tool calling for chat completions, in the Hermes format (Qwen2.5, Hermes, SmolLM2), as vLLM does it.

A model calls a tool by writing `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`. tool_choice
"auto" leaves the model free and parses such blocks out of its text; "required" and a named function constrain
the output with a JSON schema (StructuredOutputsParams, compiled by xgrammar) so it always parses; "none"
generates plain text. A template that renders tools itself gets them as `tools=`; for one that renders only
role and content (SmolLM2-135M's), the tools go into the system message as DEFAULT_TOOL_PROMPT.
"""
from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any, Callable

from pagedserve.sampling_params import StructuredOutputsParams
from pagedserve.server.protocol import bad_request, shorten

MAX_TOOLS = 128  # OpenAI's limit
NAME_RE = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for function names
START, END = "<tool_call>", "</tool_call>"
BLOCK_RE = re.compile(re.escape(START) + "(.*?)" + re.escape(END), re.DOTALL)
# The start of a "required" array element, up to where its parameters value begins: the grammar writes the keys
# in the schema's order, with JSON whitespace between tokens.
JSON_WS = r"[ \t\n\r]*"
HEAD_RE = re.compile(JSON_WS.join([r"\{", '"name"', ":", r'("(?:[^"\\]|\\.)*")', ",", '"parameters"', ":", ""]))

# The system prompt Qwen2.5's and Hermes' templates write, verbatim, so a model trained on that format sees
# what it knows. "{tools}" is replaced (not str.format: the text has literal braces) by one JSON line per tool.
DEFAULT_TOOL_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call>"""

IdFactory = Callable[[], str]


def make_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)  # as HF templates' tojson and vLLM: text stays readable


def _not_json(name: str) -> Any:
    raise ValueError(name)


def _loads(text: str) -> Any:
    """The JSON value of text, or None when it is not strict JSON (Python's parser takes NaN and Infinity,
    which json.dumps would then write into the arguments)."""
    try:
        return json.loads(text, parse_constant=_not_json)
    except ValueError:  # JSONDecodeError included
        return None


def _call(name: str, arguments: str, new_id: IdFactory) -> dict:
    return {"id": new_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


def _tool_delta(index: int, call: dict) -> dict:
    return {"tool_calls": [{"index": index, **call}]}


@dataclass
class ToolPlan:
    functions: list[dict]  # validated {"name", "description"?, "parameters"}
    choice: str            # "none" | "auto" | "required" | "named"
    named: str | None      # the function's name when choice == "named"
    parallel: bool         # parallel_tool_calls: several calls in one answer

    def known(self, name: Any) -> bool:
        """Whether name (from model output: any JSON value, maybe unhashable) names one of the functions."""
        return isinstance(name, str) and any(f["name"] == name for f in self.functions)

    def structured_outputs(self) -> StructuredOutputsParams | None:
        """The grammar the output must follow: only "required" and "named" constrain it (as vLLM)."""
        if self.choice == "named":
            function = next(f for f in self.functions if f["name"] == self.named)
            return StructuredOutputsParams(json=function["parameters"])
        if self.choice == "required":
            return StructuredOutputsParams(json=required_schema(self.functions, self.parallel))
        return None

    def conversation(self, conversation: list[dict], template_supports_tools: bool) -> tuple[list[dict], dict]:
        """(messages for the chat template, extra apply_chat_template kwargs).

        With "none" the tools are not shown (vLLM's --exclude-tools-when-tool-choice-none; its default shows
        them): no grammar keeps the model from writing a <tool_call> block, which would then reach the client
        as raw text, so a small model is better off not being offered tools it may not call. Earlier calls
        and tool results in the conversation are rendered either way."""
        tools = [] if self.choice == "none" else [{"type": "function", "function": f} for f in self.functions]
        if template_supports_tools:
            return [_template_message(m) for m in conversation], ({"tools": tools} if tools else {})
        return render_without_tool_template(conversation, tools), {}

    def parse(self, text: str, new_id: IdFactory = make_call_id) -> tuple[str | None, list[dict]]:
        """The whole output -> (content, tool_calls in OpenAI's shape). Arguments are kept as the model wrote
        them ("named", "required"), as they are streamed; "auto" re-serialises each block's JSON."""
        if self.choice == "none":
            return text, []
        if self.choice == "named":  # the grammar made the whole text the arguments; kept as written (streamed so)
            return None, [_call(self.named, text, new_id)]
        if self.choice == "required":
            items, calls = _loads(text), []
            for name, piece in _RequiredScanner(self).feed(text):  # the raw text the stream sends
                if name is not None:
                    calls.append([name, ""])
                else:
                    calls[-1][1] += piece
            if not (isinstance(items, list) and items and all(
                    isinstance(i, dict) and self.known(i.get("name")) and isinstance(i.get("parameters"), dict)
                    for i in items)
                    and [n for n, _ in calls] == [i["name"] for i in (items if self.parallel else items[:1])]):
                return (text if text.strip() else None), []  # cut short (max_tokens): the raw text, not a call
            return None, [_call(name, arguments, new_id) for name, arguments in calls]
        content, calls, pos = [], [], 0
        for m in BLOCK_RE.finditer(text):
            content.append(text[pos:m.start()])
            pos = m.end()
            call = self._block_call(m.group(1), new_id, len(calls))
            if call is False:
                content.append(m.group(0))  # not a call after all: the model's text, shown as written
            elif call is not None:
                calls.append(call)
        content.append(text[pos:])
        joined = "".join(content)
        return (joined if joined.strip() else None), calls

    def _block_call(self, inner: str, new_id: IdFactory, made: int) -> dict | None | bool:
        """The call a <tool_call> block's inside makes; False: not a call (bad JSON, unknown name);
        None: a valid call dropped because parallel_tool_calls is false and one was made (as vLLM does)."""
        value = _loads(inner)
        if not (isinstance(value, dict) and self.known(value.get("name"))
                and isinstance(value.get("arguments", {}), dict)):
            return False
        if made and not self.parallel:
            return None
        return _call(value["name"], _dumps(value.get("arguments", {})), new_id)


def _refs_root(schema: Any) -> bool:
    """Whether a schema refers to its own root ("$ref": "#"), which stops meaning it once it is nested."""
    if isinstance(schema, dict):
        return schema.get("$ref") == "#" or any(_refs_root(v) for v in schema.values())
    return isinstance(schema, list) and any(_refs_root(v) for v in schema)


def required_schema(functions: list[dict], parallel: bool) -> dict:
    """vLLM's schema for tool_choice "required": a non-empty array of {"name", "parameters"} objects, each
    one function's name and arguments. Each function's "$defs" (and draft-7 "definitions") move to the root,
    where its "#/$defs/..." references now point (its parameters are no longer the root)."""
    defs: dict[str, dict[str, Any]] = {"$defs": {}, "definitions": {}}
    branches = []
    for f in functions:
        params = dict(f["parameters"])
        if _refs_root(params):
            raise bad_request(f"the parameters of function {f['name']!r} refer to their root ('$ref': '#'), "
                              "which tool_choice 'required' cannot keep (they are nested in its schema)", "tools")
        for section, merged in defs.items():
            own = params.pop(section, {})
            if not isinstance(own, dict):
                raise bad_request(f"the {section} of function {f['name']!r} must be an object, got {shorten(own)}",
                                  "tools")
            for key, schema in own.items():
                if merged.setdefault(key, schema) != schema:
                    raise bad_request(f"tools define {section} {shorten(key)} differently; tool_choice 'required' "
                                      "needs one definition per name", "tools")
        branches.append({"type": "object", "properties": {"name": {"const": f["name"]}, "parameters": params},
                         "required": ["name", "parameters"], "additionalProperties": False})
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": branches}}
    if not parallel:
        schema["maxItems"] = 1
    schema.update({section: merged for section, merged in defs.items() if merged})
    return schema


def _history_call(call: Any) -> tuple[str, Any]:
    """(name, arguments) of an earlier assistant call; the arguments (OpenAI sends JSON text) as the object
    that templates expect, as vLLM does."""
    f = call.get("function") if isinstance(call, dict) else None
    if not isinstance(f, dict) or not isinstance(f.get("name"), str):
        raise bad_request(f"an assistant message's tool_calls entry must be {{'type': 'function', 'function': "
                          f"{{'name': ..., 'arguments': ...}}}}, got {shorten(call)}", "messages")
    arguments = f.get("arguments")
    value = _loads(arguments) if isinstance(arguments, str) else arguments
    return f["name"], value if isinstance(value, dict) else arguments


def _template_message(message: dict) -> dict:
    if message.get("role") != "assistant" or not message.get("tool_calls"):
        return message
    calls = [(c, *_history_call(c)) for c in message["tool_calls"]]
    return {**message, "tool_calls": [{**c, "function": {**c["function"], "arguments": a}} for c, _, a in calls]}


def render_without_tool_template(conversation: list[dict], tools: list[dict]) -> list[dict]:
    """The conversation as role + content messages in the Hermes text format, for templates that render
    nothing else: the tools in the system message, calls as <tool_call> blocks, results as <tool_response>
    blocks in a user turn (consecutive results share one turn, as Qwen2.5's template does)."""
    out: list[dict] = []
    after_tool = False
    for m in conversation:
        role, content = m.get("role"), m.get("content") or ""
        if role == "tool":
            block = f"<tool_response>\n{content}\n</tool_response>"
            if after_tool:
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
        elif role == "assistant" and m.get("tool_calls"):
            calls = [_history_call(c) for c in m["tool_calls"]]
            blocks = [f"{START}\n{_dumps({'name': n, 'arguments': a})}\n{END}" for n, a in calls]
            out.append({"role": role, "content": "\n".join(([content] if content else []) + blocks)})
        else:
            out.append({"role": role, "content": content})
        after_tool = role == "tool"
    if tools:
        prompt = DEFAULT_TOOL_PROMPT.replace("{tools}", "\n".join(_dumps(t) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": (out[0]["content"] + "\n\n" + prompt) if out[0]["content"] else prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def template_supports_tools(tokenizer) -> bool:
    """Whether the chat template renders tools itself (it mentions them); a dict holds named templates."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):
        template = " ".join(t for t in template.values() if isinstance(t, str))
    return re.search(r"\btools\b", template) is not None


def _function(i: int, tool: Any, seen: dict[str, int]) -> dict:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise bad_request(f"{where} must be {{'type': 'function', 'function': {{'name': ...}}}} (only function "
                          f"tools are supported), got {shorten(tool)}", where)
    f = tool["function"]
    name = f.get("name")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise bad_request(f"{where}.function.name must be 1 to 64 letters, digits, '_' or '-', got {shorten(name)}",
                          f"{where}.function.name")
    if name in seen:
        raise bad_request(f"{where}.function.name {name!r} is already the name of tools[{seen[name]}]",
                          f"{where}.function.name")
    seen[name] = i
    description, parameters = f.get("description"), f.get("parameters")
    if description is not None and not isinstance(description, str):
        raise bad_request(f"{where}.function.description must be a string, got {shorten(description)}",
                          f"{where}.function.description")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}  # no parameters
    elif not isinstance(parameters, dict) or parameters.get("type") != "object":
        raise bad_request(f"{where}.function.parameters must be a JSON schema of type 'object', got "
                          f"{shorten(parameters)}", f"{where}.function.parameters")
    described = {"description": description} if description is not None else {}
    return {"name": name, **described, "parameters": parameters}  # OpenAI's order: the prompt reads naturally


def parse_tool_plan(tools: Any, tool_choice: Any, parallel_tool_calls: Any) -> ToolPlan | None:
    """The request's tools, tool_choice and parallel_tool_calls, validated (400s name the bad field);
    None when it gives no tools. An empty tools list counts as none given, as OpenAI-compatible servers do."""
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise bad_request(f"parallel_tool_calls must be a boolean, got {shorten(parallel_tool_calls)}",
                          "parallel_tool_calls")
    if tools is not None and not isinstance(tools, list):
        raise bad_request(f"tools must be a list of function tools, got {shorten(tools)}", "tools")
    if not tools:
        if tool_choice not in (None, "none"):
            raise bad_request("tool_choice is only allowed when tools are given", "tool_choice")
        return None
    if len(tools) > MAX_TOOLS:
        raise bad_request(f"tools holds {len(tools)} tools; at most {MAX_TOOLS} are allowed", "tools")
    seen: dict[str, int] = {}
    functions = [_function(i, t, seen) for i, t in enumerate(tools)]
    named = None
    if tool_choice is None:
        choice = "auto"
    elif isinstance(tool_choice, str) and tool_choice in ("none", "auto", "required"):
        choice = tool_choice
    elif (isinstance(tool_choice, dict) and tool_choice.get("type") == "function"
          and isinstance(tool_choice.get("function"), dict) and isinstance(tool_choice["function"].get("name"), str)):
        choice, named = "named", tool_choice["function"]["name"]
        if named not in seen:
            raise bad_request(f"tool_choice names the function {shorten(named)}, which is not among tools",
                              "tool_choice")
    else:
        raise bad_request("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': "
                          f"{{'name': ...}}}}, got {shorten(tool_choice)}", "tool_choice")
    plan = ToolPlan(functions, choice, named, True if parallel_tool_calls is None else parallel_tool_calls)
    if choice == "required":
        required_schema(functions, plan.parallel)  # a $defs clash is the request's fault: a 400 now, not later
    return plan


class _RequiredScanner:
    """Finds each call in a "required" output as it arrives: where an element's parameters value begins (its
    name is known by then) and the raw text of that value. Scans each new character once, tracking the open
    brackets and strings; the grammar makes the output valid JSON, so nothing more is checked here."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan, self.text = plan, ""
        self._stack = ""           # the open "[" and "{", outermost first
        self._in_str = self._esc = False
        self._item = 0             # where the current array element began
        self._args: int | None = None  # where the current parameters value began, while it is open
        self._calls = 0

    def feed(self, text: str) -> list[tuple[str | None, str]]:
        """(name, "") when a call begins; (None, piece) for the text of the latest call's arguments."""
        start, self.text, out = len(self.text), self.text + text, []
        for i in range(start, len(self.text)):
            c = self.text[i]
            if self._in_str:  # brackets in strings do not count; an escaped quote does not end one
                if self._esc:
                    self._esc = False
                elif c == "\\":
                    self._esc = True
                elif c == '"':
                    self._in_str = False
            elif c == '"':
                self._in_str = True
            elif c in "[{":
                if self._stack == "[":
                    self._item = i
                elif self._stack == "[{" and c == "{" and (self.plan.parallel or not self._calls) and (
                        m := HEAD_RE.fullmatch(self.text, self._item, i)) and self.plan.known(name := _loads(m[1])):
                    self._args, self._calls = i, self._calls + 1
                    out.append((name, ""))
                self._stack += c
            elif c in "]}":
                self._stack = self._stack[:-1]
                if self._args is not None and self._stack == "[{":  # the value ends at its own brace
                    out.append((None, self.text[max(self._args, start):i + 1]))
                    self._args = None
        if self._args is not None and text:  # the open value's text so far
            out.append((None, self.text[max(self._args, start):]))
        return out


class ToolCallStream:
    """One choice's streamed text -> OpenAI chat deltas; what they add up to equals plan.parse(whole text)
    (given the same id factory). "auto" streams content until a possible "<tool_call>" start, holds back only
    that, and sends each block as one tool_call delta when its end arrives. Whitespace-only content is held
    until something else comes, because parse() calls whitespace-only content None. "required" sends a call's
    header as soon as its parameters begin, then their text as it comes (as vLLM does); so an output cut short
    (max_tokens) shows the calls begun so far, where parse() gives the whole text as content and no call: the
    equality holds for outputs the grammar completed, and for any output in which no call began."""

    def __init__(self, plan: ToolPlan, new_id: IdFactory = make_call_id) -> None:
        self.plan, self.new_id = plan, new_id
        self._buf = ""             # auto: text not yet sent (a possible tag start, or an open block)
        self._in_block = False     # auto: _buf starts with START
        self._scan = 0             # auto: where in _buf to look for END next
        self._calls = 0            # tool calls sent
        self._pending = ""         # auto: content held while it is all whitespace
        self._started = False      # auto: non-whitespace content sent; named: the call's header sent
        self._required = _RequiredScanner(plan) if plan.choice == "required" else None

    def feed(self, text: str) -> list[dict]:
        choice = self.plan.choice
        if choice == "none":
            return [{"content": text}] if text else []
        if self._required is not None:
            out = []
            for name, piece in self._required.feed(text):
                if name is not None:
                    out.append(_tool_delta(self._calls, _call(name, "", self.new_id)))
                    self._calls += 1
                else:
                    out.append(_tool_delta(self._calls - 1, {"function": {"arguments": piece}}))
            return out
        if choice == "named":
            out = self._named_header()
            return out + [_tool_delta(0, {"function": {"arguments": text}})] if text else out
        self._buf += text
        out: list[dict] = []
        while True:
            if not self._in_block:
                i = self._buf.find(START)
                if i < 0:  # send all but a tail that could still become START
                    hold = next((n for n in range(min(len(START) - 1, len(self._buf)), 0, -1)
                                 if START.startswith(self._buf[-n:])), 0)
                    out += self._content(self._buf[:len(self._buf) - hold])
                    self._buf = self._buf[len(self._buf) - hold:]
                    return out
                out += self._content(self._buf[:i])
                self._buf, self._in_block, self._scan = self._buf[i:], True, len(START)
            j = self._buf.find(END, self._scan)
            if j < 0:
                self._scan = max(len(START), len(self._buf) - len(END) + 1)
                return out
            block, self._buf, self._in_block = self._buf[:j + len(END)], self._buf[j + len(END):], False
            call = self.plan._block_call(block[len(START):j], self.new_id, self._calls)
            if call is False:
                out += self._content(block)
            elif call is not None:
                out.append(_tool_delta(self._calls, call))
                self._calls += 1

    def finish(self) -> list[dict]:
        if self.plan.choice == "named":
            return self._named_header()  # an empty output still made the call
        if self._required is not None:  # with no call begun, parse() finds none either: the text is content
            text = self._required.text
            return [{"content": text}] if not self._calls and text.strip() else []
        if self.plan.choice == "auto":  # an unterminated block or a held tag start is text after all
            rest, self._buf, self._in_block = self._buf, "", False
            return self._content(rest)
        return []

    @property
    def made_calls(self) -> bool:
        """Whether a tool call was sent (so the choice finishes with "tool_calls")."""
        return self._calls > 0

    def _named_header(self) -> list[dict]:
        if self._started:
            return []
        self._started = True
        return [_tool_delta(0, _call(self.plan.named, "", self.new_id))]

    def _content(self, text: str) -> list[dict]:
        if not self._started:
            self._pending += text
            if not self._pending.strip():
                return []
            text, self._pending, self._started = self._pending, "", True
        return [{"content": text}] if text else []

