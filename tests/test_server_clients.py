"""Clients no one here wrote, unchanged, against the server: the openai SDK (structured output with .parse,
json_object, regex and choice, tool calls with every tool_choice, streamed and not, echo with logprobs),
LangChain's ChatOpenAI (with_structured_output, all three methods), and the exact requests lm-evaluation-harness
sends (recorded from lm-eval 0.4.13's local-completions and local-chat-completions; lm-eval itself is ~900 MB
of dependencies, so README.md shows how to run it). The default model for what needs a model that follows
instructions; the tiny random model for exact logprobs against transformers and for refusals."""
from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest
import torch
from pydantic import BaseModel, Field

from test_server import assert_error, running_server, wait_idle

pytest.importorskip("xgrammar")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}
ASK_WEATHER = [{"role": "user", "content": "What's the weather in Paris?"}]


class Person(BaseModel):
    """A person."""
    name: str = Field(description="The person's name")
    age: int


@pytest.fixture(scope="module")
def default_server():
    with running_server(None, max_model_len=2048) as (base, engine):
        yield base


@pytest.fixture(scope="module")
def client(default_server):
    return openai.OpenAI(base_url=default_server + "/v1", api_key="unused", max_retries=0, timeout=120)


def model_of(client) -> str:
    return client.models.list().data[0].id


# ---- the openai SDK ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_sdk_parse_returns_the_pydantic_object(client):
    r = client.chat.completions.parse(model=model_of(client), response_format=Person, temperature=0, messages=[
        {"role": "user", "content": "Describe a person named Tom aged 31 as JSON."}])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.parsed == Person(name="Tom", age=31)
    # Streamed, through the SDK's stream helper.
    with client.chat.completions.stream(model=model_of(client), response_format=Person, temperature=0, messages=[
            {"role": "user", "content": "Describe a person named Ada aged 36 as JSON."}]) as stream:
        final = stream.get_final_completion()
    assert isinstance(final.choices[0].message.parsed, Person)


@pytest.mark.slow
def test_sdk_json_object_regex_and_choice(client):
    m = model_of(client)
    r = client.chat.completions.create(model=m, response_format={"type": "json_object"}, temperature=0, max_tokens=100,
                                       messages=[{"role": "user", "content": 'Return JSON with the keys "name" and '
                                                                            '"age" for: Ada is 36.'}])
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    for stream in (False, True):
        out = client.completions.create(model=m, prompt="Call me at", max_tokens=20, n=3, seed=1, stream=stream,
                                        extra_body={"structured_outputs": {"regex": r"\d{3}-\d{4}"}})
        texts = {}
        for chunk in (out if stream else [out]):
            for c in chunk.choices:
                texts[c.index] = texts.get(c.index, "") + c.text
        assert len(texts) == 3 and all(re.fullmatch(r"\d{3}-\d{4}", t) for t in texts.values()), texts
    r = client.chat.completions.create(model=m, messages=[{"role": "user", "content": "Is the sky blue?"}], n=4, max_tokens=5,
                                       logprobs=True, top_logprobs=20,
                                       extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert {c.message.content for c in r.choices} <= {"yes", "no"}
    # Only a few tokens are possible under the grammar: the top 20 list no impossible (-inf) one.
    first = r.choices[0].logprobs.content[0]
    assert all(t.logprob > float("-inf") and ("yes".startswith(t.token) or "no".startswith(t.token))
               for t in first.top_logprobs)


def _streamed_calls(chunks) -> tuple[str, list[dict], str]:
    """(content, tool calls, finish_reason) reassembled from a stream as OpenAI clients do."""
    content, calls, finish = "", {}, None
    for ch in chunks:
        for c in ch.choices:
            content += c.delta.content or ""
            for t in c.delta.tool_calls or []:
                call = calls.setdefault(t.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = call["id"] or t.id
                call["name"] += (t.function.name or "") if t.function else ""
                call["arguments"] += (t.function.arguments or "") if t.function else ""
            finish = c.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


@pytest.mark.slow
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_sdk_constrained_tool_calls_validate_streamed_or_not(client, choice):
    params = WEATHER["function"]["parameters"]
    kw = dict(model=model_of(client), messages=ASK_WEATHER, tools=[WEATHER], tool_choice=choice, temperature=0,
              max_tokens=100)
    r = client.chat.completions.create(**kw)
    msg = r.choices[0].message
    assert msg.tool_calls and msg.content is None
    assert r.choices[0].finish_reason == ("tool_calls" if choice == "required" else "stop")
    for call in msg.tool_calls:
        assert call.function.name == "get_weather" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), params)
    content, calls, finish = _streamed_calls(client.chat.completions.create(**kw, stream=True))
    assert not content and finish == r.choices[0].finish_reason
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls]


@pytest.mark.slow
def test_sdk_auto_tool_calls_are_parsed_from_the_text_and_round_trip(client):
    # The grammar makes the model write a Hermes call, so "auto"'s parsing is exercised whatever the model prefers.
    call_text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    kw = dict(model=model_of(client), messages=ASK_WEATHER, tools=[WEATHER], tool_choice="auto",
              extra_body={"structured_outputs": {"choice": [call_text]}})
    r = client.chat.completions.create(**kw)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content is None
    assert [(c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls] == [("get_weather", {"city": "Paris"})]
    content, calls, finish = _streamed_calls(client.chat.completions.create(**kw, stream=True))
    assert (content, finish) == ("", "tool_calls") and json.loads(calls[0]["arguments"]) == {"city": "Paris"}
    # The answer goes back as a tool message; the model then answers in text.
    history = ASK_WEATHER + [msg.model_dump(exclude_none=True),
                             {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": "sunny, 24 C"}]
    r = client.chat.completions.create(model=model_of(client), messages=history, tools=[WEATHER], max_tokens=30,
                                       temperature=0)
    assert r.choices[0].message.content
    # tool_choice "none": text only.
    r = client.chat.completions.create(model=model_of(client), messages=ASK_WEATHER, tools=[WEATHER],
                                       tool_choice="none", max_tokens=10)
    assert not r.choices[0].message.tool_calls and r.choices[0].message.content


# ---- LangChain ---------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("method", ["json_schema", "json_mode", "function_calling"])
def test_langchain_with_structured_output(default_server, method):
    langchain_openai = pytest.importorskip("langchain_openai")
    model = httpx.get(default_server + "/v1/models").json()["data"][0]["id"]
    llm = langchain_openai.ChatOpenAI(base_url=default_server + "/v1", api_key="unused", model=model,
                                      temperature=0, max_retries=0)
    chat = llm.with_structured_output(Person, method=method)
    # json_mode sends no schema (LangChain leaves that to the prompt), so the prompt names the keys.
    got = chat.invoke('Return JSON with the keys "name" and "age" for: Ada is 36.')
    assert got == Person(name="Ada", age=36)
    if method != "json_mode":
        assert list(chat.stream("Describe Ada, who is 36."))[-1].name == "Ada"


# ---- the tiny model: exact prompt logprobs, lm-eval's requests, refusals -------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    with running_server(tiny_model_dir) as (base, engine):
        yield base


def test_echo_logprobs_equal_transformers(tiny, tiny_model_dir):
    from transformers import AutoModelForCausalLM
    ids = [(13 * i + 7) % 300 + 10 for i in range(40)]
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        lp = torch.log_softmax(ref(torch.tensor([ids])).logits[0].float(), dim=-1)
    want = lp[:-1].gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)
    client = openai.OpenAI(base_url=tiny + "/v1", api_key="unused", max_retries=0)
    model = model_of(client)
    for max_tokens in (0, 1):
        r = client.completions.create(model=model, prompt=ids, echo=True, logprobs=2, max_tokens=max_tokens,
                                      temperature=0)
        got = r.choices[0].logprobs
        assert len(got.token_logprobs) == len(ids) + max_tokens and got.token_logprobs[0] is None
        torch.testing.assert_close(torch.tensor(got.token_logprobs[1:len(ids)]), want, atol=1e-4, rtol=0)
        assert r.usage.completion_tokens == max_tokens
        assert r.choices[0].text.startswith(httpx.post(f"{tiny}/detokenize", json={"tokens": ids}).json()["prompt"])
    # Streamed, the first chunk carries the echoed prompt and its logprobs.
    chunks = list(client.completions.create(model=model, prompt=ids, echo=True, logprobs=0, max_tokens=3,
                                            temperature=0, stream=True))
    whole = client.completions.create(model=model, prompt=ids, echo=True, logprobs=0, max_tokens=3, temperature=0)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    streamed = [x for c in chunks if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs]
    assert streamed == whole.choices[0].logprobs.token_logprobs
    # vLLM's prompt_logprobs extra: {token id: {logprob, rank, decoded_token}} per position.
    r = httpx.post(f"{tiny}/v1/completions", json={"prompt": ids, "max_tokens": 1, "prompt_logprobs": 0}).json()
    plp = r["choices"][0]["prompt_logprobs"]
    assert plp[0] is None and abs(plp[5][str(ids[5])]["logprob"] - float(want[4])) < 1e-4
    assert_error(httpx.post(f"{tiny}/v1/completions", json={"prompt": ids, "prompt_logprobs": 0, "stream": True}),
                 400, "stream")


def test_lm_eval_requests(tiny):
    """lm-eval's local-completions, as recorded: its tokenizer probes, a loglikelihood request (token ids, one
    list per prompt, echo, max_tokens 1, logprobs 1) and a generate_until request; what it reads back."""
    with httpx.Client(base_url=tiny, timeout=60) as http:
        info = http.get("/tokenizer_info").json()  # lm-eval's "auto" picks the remote tokenizer when both answer
        assert info["eos_token"] == "<|im_end|>" and "chat_template" in info and info["bos_token"]
        tokens = http.post("/tokenize", json={"prompt": "test", "add_special_tokens": False}).json()["tokens"]
        assert tokens and http.post("/detokenize", json={"tokens": tokens}).json()["prompt"] == "test"
        model = http.get("/v1/models").json()["data"][0]["id"]
        context, continuation = [17, 42, 90, 33, 150, 201, 8, 64], [77, 12, 5]
        r = http.post("/v1/completions", json={"model": model, "prompt": [context + continuation], "temperature": 0,
                                                "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True}).json()
        choice = r["choices"][0]
        token_logprobs, top_logprobs = choice["logprobs"]["token_logprobs"], choice["logprobs"]["top_logprobs"]
        ctxlen = len(context)
        assert len(token_logprobs) == len(context + continuation) + 1  # the [ctxlen:-1] slice is the continuation
        assert all(isinstance(x, float) for x in token_logprobs[ctxlen:-1])
        greedy = 0
        for tok_lp, top in zip(token_logprobs[1:], top_logprobs[1:]):  # is_greedy compares these exactly
            assert len(top) in (1, 2)  # the top-1 and the token itself, if it is not the top-1
            best = max(top.values())
            greedy += tok_lp == best
            assert tok_lp == best if len(top) == 1 else tok_lp < best
        assert greedy >= 1  # the generated token (temperature 0) is the top-1, exactly
        r = http.post("/v1/completions", json={"model": model, "prompt": [context], "max_tokens": 16,
                                                "temperature": 0.0, "stop": ["\n", "Q:", "<|im_end|>"],
                                                "seed": 1234}).json()
        assert r["choices"][0]["index"] == 0 and isinstance(r["choices"][0]["text"], str)
        r = http.post("/v1/chat/completions", json={"model": model, "max_tokens": 16, "temperature": 0.0,
                                                     "messages": [{"role": "user", "content": "Q: 2+2?\nA:"}],
                                                     "stop": ["\n", "Q:"], "seed": 1234}).json()
        assert isinstance(r["choices"][0]["message"]["content"], str)
        assert http.get(f"/v1/models/{model}").json()["id"] == model
        assert_error(http.get("/v1/models/not-this-one"), 404, "does not exist")


REFUSALS = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objec"}}}},
     "response_format", "objec"),
    ({"response_format": {"type": "yaml"}}, "response_format", "yaml"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs", "regex"),
    ({"structured_outputs": {"grammar": "root ::= nothing"}}, "structured_outputs", "nothing"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs", "not supported"),
    ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}, "structured_outputs", "both"),
    ({"guided_regex": "(unclosed"}, "guided_regex", "regex"),
    ({"guided_choice": ["a"], "structured_outputs": {"regex": "a"}}, "structured_outputs", "guided"),
    ({"logit_bias": {"abc": 1}}, "logit_bias", "token ids"),
    ({"logit_bias": {"-5": 1}}, "logit_bias", "token ids"),
    ({"structured_outputs": {"choice": "yes"}}, "structured_outputs", "list of strings"),
    ({"logit_bias": {"5": 150}}, "logit_bias", "[-100, 100]"),
    ({"logit_bias": {"999999": 1}}, "logit_bias", "token ids must be in"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice", "other"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name", "letters"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
     "cannot be combined"),
    ({"tool_choice": "required"}, "tool_choice", "tools"),
    ({"prompt_logprobs": 21}, "prompt_logprobs", "[0, 20]"),
]


@pytest.mark.parametrize("extra, param, words", REFUSALS)
def test_refusals_are_clear_and_leave_nothing(tiny, extra, param, words):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}
    err = assert_error(httpx.post(f"{tiny}/v1/chat/completions", json=body, timeout=30), 400, words)
    assert err["param"] == param
    assert wait_idle(tiny)["pagedserve:kv_cache_usage_perc"] == 0


def test_guided_names_constrain_as_structured_outputs(tiny):
    r = httpx.post(f"{tiny}/v1/completions", json={"prompt": "hi", "max_tokens": 10, "n": 3, "seed": 0,
                                                   "guided_choice": ["left", "right"]}).json()
    assert {c["text"] for c in r["choices"]} <= {"left", "right"}


def test_completions_refusals(tiny):
    assert_error(httpx.post(f"{tiny}/v1/completions", json={"prompt": "hi", "max_tokens": 0}), 400, "at least 1")
    ok = httpx.post(f"{tiny}/v1/completions", json={"prompt": "hi", "max_tokens": 0, "echo": True}).json()
    assert ok["choices"][0]["text"] == "hi" and ok["usage"]["completion_tokens"] == 0
    r = httpx.post(f"{tiny}/v1/completions", json={"prompt": "hi", "max_tokens": 5, "temperature": 0,
                                                   "response_format": {"type": "json_schema", "json_schema": {
                                                       "name": "b", "schema": {"enum": [True, False]}}}}).json()
    assert json.loads(r["choices"][0]["text"]) in (True, False)


def test_beam_search_through_the_server(tiny, tiny_model_dir):
    """use_beam_search with n beams: the n best hypotheses, best first, as LLM.beam_search gives them."""
    from pagedserve import LLM
    from pagedserve.sampling_params import BeamSearchParams
    ids = [(3 * i) % 290 + 10 for i in range(12)]
    want = LLM(tiny_model_dir, dtype="float32", num_kv_blocks=64).beam_search(
        [{"prompt_token_ids": ids}], BeamSearchParams(beam_width=3, max_tokens=6, early_stopping=True))[0]
    body = {"prompt": ids, "n": 3, "max_tokens": 6, "use_beam_search": True, "early_stopping": True}
    for stream in (False, True):
        r = httpx.post(f"{tiny}/v1/completions", json={**body, "stream": stream}, timeout=60)
        assert r.status_code == 200, r.text
        if stream:
            texts = {}
            for line in r.text.splitlines():
                if line.startswith("data: {"):
                    for c in json.loads(line[6:])["choices"]:
                        texts[c["index"]] = texts.get(c["index"], "") + c["text"]
            got = [texts[i] for i in sorted(texts)]
        else:
            got = [c["text"] for c in r.json()["choices"]]
        assert got == [s.text for s in want.sequences]
    r = httpx.post(f"{tiny}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "n": 2,
                                                        "max_tokens": 4, "use_beam_search": True}, timeout=60).json()
    assert len(r["choices"]) == 2
    assert_error(httpx.post(f"{tiny}/v1/completions", json={**body, "logprobs": 1}), 400, "use_beam_search")
    assert wait_idle(tiny)["pagedserve:kv_cache_usage_perc"] == 0
