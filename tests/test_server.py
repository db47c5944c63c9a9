"""The OpenAI-compatible server end to end: a tiny random-weight model behind real uvicorn servers
(in this process, on free ports), called with the official openai client and with httpx."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import threading
import time

import httpx
import openai
import pytest

from conftest import build_tiny_hf_model
from pagedserve.async_engine import AsyncEngine
from pagedserve.engine import LLMEngine
from pagedserve.server.app import build_app
from pagedserve.server.args import ServerConfig
from pagedserve.server.auth import load_identities
from pagedserve.server.lifecycle import build_server

# float32: bfloat16 (auto on CPUs that have it) lets batch composition flip near-tied greedy picks
ENGINE = dict(num_kv_blocks=320, block_size=8, max_num_seqs=64, max_num_batched_tokens=512, dtype="float32")
GREEDY = dict(temperature=0.0, extra_body={"ignore_eos": True})


@contextlib.contextmanager
def running_server(model_dir: str, config: ServerConfig | None = None, tokenizer=None, **engine_options):
    """The server `pagedserve serve` runs (build_server), in a thread on a free port; yields (base_url, AsyncEngine)."""
    config = config or ServerConfig()
    engine = AsyncEngine(LLMEngine(model=model_dir, **{**ENGINE, **engine_options}), max_waiting=config.max_waiting)
    server, thread, sock, base = serve_in_thread(build_app(engine, config, tokenizer), config)
    try:
        yield base, engine
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def serve_in_thread(app, config: ServerConfig):
    """build_server(app, config) started in a daemon thread on a free port, once it accepts connections.
    Returns (server, thread, socket, base_url)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = build_server(app, config, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    return server, thread, sock, f"http://127.0.0.1:{sock.getsockname()[1]}"


def scrape(base: str, headers: dict | None = None) -> dict[str, float]:
    """/metrics as {series: value} (series without labels, plus histogram _count lines)."""
    text = httpx.get(f"{base}/metrics", headers=headers).text
    out = {}
    for line in text.splitlines():
        m = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*) (\S+)", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def wait_idle(base: str, headers: dict | None = None, timeout: float = 10.0) -> dict[str, float]:
    """Metrics once no request runs or waits and no KV block is in use (fails after timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(base, headers)
        idle = (m["pagedserve:num_requests_running"] == 0 and m["pagedserve:num_requests_waiting"] == 0
                and m["pagedserve:kv_cache_usage_perc"] == 0)
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


def assert_error(r: httpx.Response, status: int, *words: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    for w in words:
        assert w in err["message"], (w, err["message"])
    return err


CONTEXT = 2048


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """The tiny random LLaMA with a longer window, so a request can run long enough to be left."""
    folder = str(tmp_path_factory.mktemp("tiny_server_llama"))
    build_tiny_hf_model(folder, "llama", max_position_embeddings=CONTEXT)
    return folder


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    audit = str(tmp_path_factory.mktemp("audit") / "audit.jsonl")
    with running_server(model_dir, ServerConfig(audit_log=audit)) as (base, engine):
        yield base, engine, audit


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def model_name(client) -> str:
    return client.models.list().data[0].id


# ---- plain endpoints -----------------------------------------------------------------------------
def test_models_health_version_tokenize(server, client, model_dir):
    base = server[0]
    assert httpx.get(f"{base}/health").status_code == 200
    assert httpx.get(f"{base}/version").json()["version"]
    models = client.models.list().data
    assert [m.id for m in models] == [os.path.basename(model_dir)]
    name = models[0].id
    tok = httpx.post(f"{base}/tokenize", json={"model": name, "prompt": "Hello world"}).json()
    assert tok["count"] == len(tok["tokens"]) > 0 and tok["max_model_len"] == CONTEXT
    assert httpx.post(f"{base}/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"] == "Hello world"
    chat = httpx.post(f"{base}/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["count"] > tok["count"] - 2  # the template wraps the message


# ---- generation through the official client ---------------------------------------------------
def test_completion_stream_equals_non_stream(client):
    name = model_name(client)
    full = client.completions.create(model=name, prompt="The quick brown fox", max_tokens=12, **GREEDY)
    assert full.object == "text_completion" and len(full.choices) == 1
    assert full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 12 and full.usage.prompt_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + 12
    chunks = list(client.completions.create(model=name, prompt="The quick brown fox", max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].text for c in chunks[:-1]) == full.choices[0].text
    assert chunks[-2].choices[0].finish_reason == "length"


def test_chat_stream_equals_non_stream(client):
    name = model_name(client)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]
    full = client.chat.completions.create(model=name, messages=msgs, max_completion_tokens=10, **GREEDY)
    assert full.object == "chat.completion"
    assert full.choices[0].message.role == "assistant" and full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 10
    stream = list(client.chat.completions.create(model=name, messages=msgs, max_tokens=10, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert stream[0].choices[0].delta.role == "assistant"
    assert stream[-1].choices == [] and stream[-1].usage.completion_tokens == 10
    assert stream[-1].usage.prompt_tokens == full.usage.prompt_tokens
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in stream if c.choices][-1] == "length"


def test_n_and_seed(client):
    name = model_name(client)
    kw = dict(model=name, prompt="Hello world!", max_tokens=16, temperature=1.0, extra_body={"ignore_eos": True})
    a = client.completions.create(n=2, seed=1234, **kw)
    assert sorted(c.index for c in a.choices) == [0, 1]
    assert a.usage.completion_tokens == 32
    b = client.completions.create(n=2, seed=1234, **kw)
    assert [c.text for c in sorted(a.choices, key=lambda c: c.index)] == \
           [c.text for c in sorted(b.choices, key=lambda c: c.index)]
    assert a.choices[0].text != a.choices[1].text  # the samples draw from different streams
    c = client.completions.create(n=1, seed=99, **kw)
    assert c.choices[0].text not in (a.choices[0].text, a.choices[1].text)
    chat = [client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}], n=2, seed=7,
                                           max_tokens=8, temperature=1.0, extra_body={"ignore_eos": True})
            for _ in range(2)]
    assert [ch.message.content for ch in chat[0].choices] == [ch.message.content for ch in chat[1].choices]
    streamed = list(client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}], n=2,
                                                   seed=7, max_tokens=8, temperature=1.0, stream=True,
                                                   extra_body={"ignore_eos": True}))
    for i in range(2):
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices and c.choices[0].index == i)
        assert text == chat[0].choices[i].message.content


def test_stop_string(client):
    name = model_name(client)
    kw = dict(model=name, prompt="Paged attention stores", max_tokens=48, **GREEDY)
    text = client.completions.create(**kw).choices[0].text
    # a printable two-character piece that first occurs after the start
    stops = [text[i:i + 2] for i in range(1, len(text) - 1)
             if text[i:i + 2].isascii() and text[i:i + 2].isprintable() and text.find(text[i:i + 2]) == i]
    assert stops, f"no printable stop candidate in {text!r}"
    stop = stops[0]
    cut = client.completions.create(stop=[stop, "never-there"], **kw).choices[0]
    assert cut.finish_reason == "stop" and cut.text == text[:text.index(stop)]
    kept = client.completions.create(stop=stop, **{**kw, "extra_body": {"ignore_eos": True,
                                                                       "include_stop_str_in_output": True}})
    assert kept.choices[0].text == text[:text.index(stop) + len(stop)]


def test_logprobs(client):
    name = model_name(client)
    r = client.completions.create(model=name, prompt="Hello", max_tokens=6, logprobs=3, **GREEDY)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    for token, token_lp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 4 and token_lp <= 0
        assert token_lp == pytest.approx(max(top.values()))  # greedy picks the most likely token
    chat = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                          logprobs=True, top_logprobs=2, **GREEDY)
    content = chat.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert bytes(entry.bytes).decode(errors="replace") == entry.token
    plain = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_batched_and_token_id_prompts(server, client):
    name = model_name(client)
    prompts = ["The quick brown fox", "Hello world"]
    batch = client.completions.create(model=name, prompt=prompts, max_tokens=6, n=2, **GREEDY)
    assert sorted(c.index for c in batch.choices) == [0, 1, 2, 3]
    by_index = {c.index: c.text for c in batch.choices}
    for i, p in enumerate(prompts):
        alone = client.completions.create(model=name, prompt=p, max_tokens=6, **GREEDY).choices[0].text
        assert by_index[2 * i] == by_index[2 * i + 1] == alone  # greedy: both samples agree
    ids = httpx.post(f"{server[0]}/tokenize", json={"prompt": prompts[1]}).json()["tokens"]
    by_ids = client.completions.create(model=name, prompt=ids, max_tokens=6, **GREEDY)
    assert by_ids.choices[0].text == by_index[2]
    two = client.completions.create(model=name, prompt=[ids, ids], max_tokens=6, **GREEDY)
    assert [c.text for c in two.choices] == [by_index[2]] * 2
    assert two.usage.prompt_tokens == 2 * len(ids)


# ---- many clients, disconnects --------------------------------------------------------------------
def test_concurrent_streams_with_disconnects(server):
    base, _, audit = server
    max_tokens = 48
    audited = len(open(audit).readlines())
    generated = scrape(base)["pagedserve:generation_tokens_total"]

    async def one(http: httpx.AsyncClient, i: int) -> tuple[str, int] | None:
        body = {"prompt": f"Client {i} asks: what is {i} plus {i}?", "max_tokens": max_tokens, "stream": True,
                "temperature": 0.0, "ignore_eos": True, "stream_options": {"include_usage": True}}
        text, usage, chunks = "", None, 0
        async with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return text, usage
                data = json.loads(line[6:])
                if data["choices"]:
                    text += data["choices"][0]["text"]
                    chunks += 1
                    if i % 3 == 0 and chunks == 2:
                        return None  # leave mid-stream: the context manager closes the connection
                else:
                    usage = data["usage"]["completion_tokens"]
        raise AssertionError("the stream ended without [DONE]")

    async def main():
        async with httpx.AsyncClient(base_url=base, timeout=120,
                                     limits=httpx.Limits(max_connections=64)) as http:
            return await asyncio.gather(*(one(http, i) for i in range(32)))

    results = asyncio.run(main())
    for i, res in enumerate(results):
        if i % 3 == 0:
            assert res is None
        else:
            text, n = res
            assert n == max_tokens, (i, n)
    # the completed ones have the same text as one request alone would
    for i in (1, 17, 31):
        alone = httpx.post(f"{base}/v1/completions", timeout=60, json={
            "prompt": f"Client {i} asks: what is {i} plus {i}?", "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True}).json()
        assert alone["choices"][0]["text"] == results[i][0]
    m = wait_idle(base)
    assert m["pagedserve:num_requests_running"] == 0 and m["pagedserve:num_requests_waiting"] == 0
    assert m["pagedserve:kv_cache_usage_perc"] == 0
    assert m["pagedserve:time_to_first_token_seconds_count"] >= 32
    records = [json.loads(line) for line in open(audit).readlines()[audited:]]
    streams = [r for r in records if r["endpoint"] == "/v1/completions"][:32]
    gone = [r for r in streams if r["status_code"] == 499]
    assert len(gone) == 11 and all(r["finish_reason"] == "abort" for r in gone)
    assert all(r["completion_tokens"] < max_tokens for r in gone)  # stopped early, not run to the end
    assert sum(r["status_code"] == 200 and r["completion_tokens"] == max_tokens for r in streams) == 21
    # the engine itself stopped the 11 that left after 2 chunks: each made well under half its tokens
    generated = m["pagedserve:generation_tokens_total"] - generated
    assert 24 * max_tokens <= generated <= 24 * max_tokens + 11 * max_tokens // 2


def test_non_stream_disconnect_aborts(server):
    base, engine, audit = server
    before = scrape(base)["pagedserve:generation_tokens_total"]
    max_tokens = CONTEXT - 48  # seconds of work on a CPU
    start = time.monotonic()
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{base}/v1/completions", timeout=0.3, json={
            "prompt": "A long answer, please.", "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True})
    m = wait_idle(base)
    assert m["pagedserve:kv_cache_usage_perc"] == 0 and m["pagedserve:num_requests_running"] == 0
    assert time.monotonic() - start < 2.0
    assert scrape(base)["pagedserve:generation_tokens_total"] - before < max_tokens  # it stopped early
    records = [json.loads(line) for line in open(audit)]
    gone = [r for r in records if r["status_code"] == 499]
    assert gone and gone[-1]["finish_reason"] == "abort" and gone[-1]["endpoint"] == "/v1/completions"


# ---- bad input --------------------------------------------------------------------------------------
BAD_REQUESTS = [
    ("/v1/completions", b"{not json", 400, ()),
    ("/v1/completions", b"[1, 2]", 400, ()),
    ("/v1/completions", {"prompt": 5}, 400, ("prompt",)),
    ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, 400, ("max_tokens",)),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, ("temperature",)),
    ("/v1/completions", {"prompt": "x", "model": "no-such-model"}, 404, ("no-such-model",)),
    ("/v1/completions", {"prompt": "x", "max_tokens": 5000}, 400, (str(CONTEXT), "5000")),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, ("n",)),
    ("/v1/completions", {"prompt": "x", "n": 100000}, 400, ("n",)),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, ("max_tokens",)),
    ("/v1/completions", {"prompt": "x", "max_tokens": -5}, 400, ("max_tokens",)),
    ("/v1/completions", {"prompt": ""}, 400, ("empty",)),
    ("/v1/completions", {"prompt": []}, 400, ()),
    ("/v1/completions", {"prompt": [1, 2, 100000]}, 400, ("token",)),
    ("/v1/completions", {"prompt": [-1]}, 400, ()),
    ("/v1/completions", {"prompt": ["ok", 3]}, 400, ("prompt",)),
    ("/v1/completions", {"prompt": "x", "logprobs": 99}, 400, ("logprobs",)),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, ("stream",)),
    ("/v1/completions", {"prompt": "x", "min_tokens": 20, "max_tokens": 5}, 400, ("min_tokens",)),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, 400, ("stop",)),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, ("top_p",)),
    ("/v1/completions", {"prompt": "x", "seed": 2**64}, 400, ("seed",)),
    ("/v1/completions", {"prompt": ["ok", "y" * 5000]}, 400, ("prompt 1",)),
    ("/v1/chat/completions", {"messages": []}, 400, ("messages",)),
    ("/v1/chat/completions", {"messages": "hello"}, 400, ("messages",)),
    ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, 400, ("role",)),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, ("logprobs",)),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 5000}]}, 400, (str(CONTEXT),)),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, 400, ()),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, ("image_url",)),
    ("/tokenize", {}, 400, ()),
    ("/detokenize", {"tokens": [10 ** 9]}, 400, ("token",)),
]


def test_bad_inputs_get_openai_errors(server, client):
    base = server[0]
    with httpx.Client(base_url=base, timeout=30) as http:
        for path, body, status, words in BAD_REQUESTS:
            if isinstance(body, bytes):
                r = http.post(path, content=body, headers={"content-type": "application/json"})
            else:
                r = http.post(path, json=body)
            assert_error(r, status, *words)
        assert_error(http.get("/v1/nothing-here"), 404)
        assert_error(http.get("/v1/completions"), 405)
    m = wait_idle(base)
    assert m["pagedserve:kv_cache_usage_perc"] == 0
    ok = client.completions.create(model=model_name(client), prompt="still alive?", max_tokens=3, **GREEDY)
    assert ok.usage.completion_tokens == 3


def test_queue_full(model_dir):
    config = ServerConfig(max_waiting=1)
    with running_server(model_dir, config, max_num_seqs=1) as (base, _):
        body = {"prompt": "busy", "max_tokens": 200, "temperature": 0.0, "ignore_eos": True, "stream": True}

        async def main():
            async with httpx.AsyncClient(base_url=base, timeout=60) as http:
                async with http.stream("POST", "/v1/completions", json=body) as running:
                    assert running.status_code == 200
                    lines = running.aiter_lines()
                    while not (await anext(lines)).startswith("data: "):  # the first token: it runs
                        pass
                    async with http.stream("POST", "/v1/completions", json=body) as waiting:
                        assert waiting.status_code == 200  # accepted, waits behind the first
                        full = await http.post("/v1/completions", json={**body, "stream": False})
                        assert_error(full, 503, "max-waiting")
                        assert full.json()["error"]["code"] == "queue_full"
                # both streams are closed: their requests are aborted and the queue is free again
                m = await asyncio.to_thread(wait_idle, base)
                assert m["pagedserve:num_requests_waiting"] == 0 and m["pagedserve:kv_cache_usage_perc"] == 0
                ok = await http.post("/v1/completions", json={"prompt": "next", "max_tokens": 2})
                assert ok.status_code == 200, ok.text

        asyncio.run(main())
        assert wait_idle(base)["pagedserve:kv_cache_usage_perc"] == 0


# ---- identities ------------------------------------------------------------------------------------
def test_identity_isolation_and_audit(model_dir, tmp_path):
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("# tenants\nalice:sk-alice-secret\nbob:sk-bob-secret\n")
    audit = tmp_path / "audit.jsonl"
    config = ServerConfig(identities=load_identities(None, str(keys_file)), audit_log=str(audit))
    prompt = "Paged attention stores keys and values in fixed-size blocks. " * 3
    with running_server(model_dir, config) as (base, _):
        def ask(key: str) -> int:
            c = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
            r = c.completions.create(model=c.models.list().data[0].id, prompt=prompt, max_tokens=2)
            return r.usage.prompt_tokens_details.cached_tokens

        assert ask("sk-alice-secret") == 0
        assert ask("sk-alice-secret") > 0     # alice's own cache
        assert ask("sk-bob-secret") == 0      # never alice's
        assert ask("sk-bob-secret") > 0
        assert httpx.get(f"{base}/health").status_code == 200  # open
        assert_error(httpx.get(f"{base}/v1/models"), 401)
        assert_error(httpx.get(f"{base}/metrics", headers={"Authorization": "Bearer wrong"}), 401)
        assert_error(httpx.post(f"{base}/v1/completions", json={"prompt": "x"},
                                headers={"Authorization": "Bearer sk-alice"}), 401)
        assert_error(httpx.post(f"{base}/v1/completions", content=b"{bad"), 401)  # no key: nothing parsed
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="nope", max_retries=0).models.list()
        m = scrape(base, {"Authorization": "Bearer sk-bob-secret"})
        assert m["pagedserve:prefix_cache_hits_total"] > 0
    text = audit.read_text()
    assert "sk-alice-secret" not in text and "sk-bob-secret" not in text
    records = [json.loads(line) for line in text.splitlines()]
    fields = {"time", "identity", "request_id", "endpoint", "model", "prompt_tokens", "completion_tokens",
              "cached_tokens", "finish_reason", "status_code", "error", "latency_s", "seq", "prev", "decision",
              "rule"}
    assert all(set(r) == fields for r in records)
    done = [r for r in records if r["endpoint"] == "/v1/completions" and r["status_code"] == 200]
    assert [r["identity"] for r in done] == ["alice", "alice", "bob", "bob"]
    assert [r["cached_tokens"] > 0 for r in done] == [False, True, False, True]
    assert all(r["completion_tokens"] == 2 and r["finish_reason"] == "length" and r["request_id"] for r in done)
    assert len({r["request_id"] for r in done}) == 4
    denied = [r for r in records if r["status_code"] == 401]
    assert len(denied) == 5 and all(r["identity"] is None and r["error"] == "invalid_api_key" for r in denied)
    assert all(r["error"] is None for r in done)
    assert not any(r["endpoint"] == "/health" for r in records)


def test_shared_prefix_cache(model_dir):
    config = ServerConfig(identities=load_identities(["key-one", "key-two"]), shared_prefix_cache=True)
    prompt = "A scheduler fills one token budget every step. " * 3
    with running_server(model_dir, config) as (base, _):
        def cached(key: str) -> int:
            r = httpx.post(f"{base}/v1/completions", headers={"Authorization": f"Bearer {key}"},
                           json={"prompt": prompt, "max_tokens": 1})
            return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

        assert cached("key-one") == 0
        assert cached("key-two") > 0  # one cache for everyone, by choice


def test_the_second_kv_tier_serves_each_key_only_its_own_blocks(model_dir):
    """A server with a small pool, a tier and swap preemption: a prompt pushed out of the pool comes back from
    the tier for the key that sent it, never for another key, and the answer is the same."""
    config = ServerConfig(identities=load_identities(["key-one", "key-two"]))
    prompt = [3 + (17 * i) % 290 for i in range(100)]
    fillers = [[3 + (31 * i + 7 * k) % 290 for i in range(80)] for k in range(1, 5)]
    with running_server(model_dir, config, num_kv_blocks=24, kv_offload_memory="4MiB",
                        preemption_mode="swap") as (base, _):
        def complete(key: str, tokens: list[int]) -> tuple[str, int]:
            r = httpx.post(f"{base}/v1/completions", headers={"Authorization": f"Bearer {key}"},
                           json={"prompt": tokens, "max_tokens": 4, "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"], r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

        def tier_hits() -> float:
            return wait_idle(base, {"Authorization": "Bearer key-one"})["pagedserve:kv_offload_hits_total"]

        text, cached = complete("key-one", prompt)
        assert cached == 0
        for f in fillers:  # 4 x 80 tokens through a pool of 24 blocks of 8: the prompt's blocks go to the tier
            complete("key-one", f)
        before = tier_hits()
        assert complete("key-two", prompt) == (text, 0) and tier_hits() == before
        again, cached = complete("key-one", prompt)
        assert again == text and cached >= 96 and tier_hits() >= before + 96


def test_request_body_limit(model_dir):
    config = ServerConfig(max_request_bytes=2000, identities=load_identities(["key-one"]))
    auth = {"Authorization": "Bearer key-one"}
    with running_server(model_dir, config) as (base, engine):
        with httpx.Client(base_url=base, timeout=30, headers=auth) as http:
            big = {"model": "m", "prompt": "word " * 1000, "max_tokens": 2}
            err = assert_error(http.post("/v1/completions", json=big), 413, "2,000 bytes", "--max-request-bytes")
            assert err["code"] == "request_too_large"

            def chunked():  # no Content-Length: the limit must hold while reading
                yield b'{"model": "m", "prompt": "'
                for _ in range(50):
                    yield b"word " * 20
                yield b'", "max_tokens": 2}'
            assert_error(http.post("/v1/completions", content=chunked(),
                                   headers={"content-type": "application/json"}), 413, "2,000 bytes")
            ok = http.post("/v1/completions", json={"model": engine.model_name, "prompt": "small",
                                                     "max_tokens": 2, "ignore_eos": True})
            assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
            # the key is checked first: no body is read for an unknown caller
            assert_error(httpx.post(base + "/v1/completions", json=big, timeout=30), 401, "API key")
        m = wait_idle(base, auth)
        assert m["pagedserve:kv_cache_usage_perc"] == 0
