"""The server against hostile or unlucky input: text work off the event loop, prompts refused by their
size before tokenizing, input validation at the door, engine failures as OpenAI errors, and an audit
line for every request, whatever it carries."""
from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from pagedserve.server.args import ServerConfig
from pagedserve.server.audit import MAX_FIELD_CHARS, AuditLog, audit_line, new_record
from pagedserve.server.auth import keys_file_warning, load_identities
from pagedserve.server.text import longest_token_chars
from pagedserve.tokenizer import load_tokenizer
from test_server import assert_error, running_server


class GatedTokenizer:
    """The real tokenizer, but encoding a text that starts with "SLOW" waits for `gate`: a stand-in for
    a prompt that takes long to tokenize. Records the length of every text it encodes."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self.entered, self.gate = threading.Event(), threading.Event()
        self.released_by_gate: bool | None = None
        self.encoded_lengths: list[int] = []

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def encode(self, text, *args, **kwargs):
        self.encoded_lengths.append(len(text))
        if text.startswith("SLOW"):
            self.entered.set()
            self.released_by_gate = self.gate.wait(20)
        return self._tokenizer.encode(text, *args, **kwargs)

    def apply_chat_template(self, conversation, *args, **kwargs):
        # Records the conversation's text length: templating a chat is tokenizing it too.
        self.encoded_lengths.append(sum(len(str(m.get("content", ""))) for m in conversation))
        return self._tokenizer.apply_chat_template(conversation, *args, **kwargs)


@pytest.fixture(scope="module")
def gated(tiny_model_dir, tmp_path_factory):
    """A server whose HTTP-side tokenizer is gated, with an audit log: (base, engine, tokenizer, audit path)."""
    audit = str(tmp_path_factory.mktemp("audit") / "audit.jsonl")
    tokenizer = GatedTokenizer(load_tokenizer(tiny_model_dir))
    with running_server(tiny_model_dir, ServerConfig(audit_log=audit), tokenizer=tokenizer) as (base, engine):
        yield base, engine, tokenizer, audit


def audit_records(path: str) -> list[dict]:
    with open(path, encoding="ascii") as f:  # every line is ASCII
        return [json.loads(line) for line in f]


def new_audit_records(path: str, before: int, count: int, timeout: float = 30.0) -> list[dict]:
    """The records after the first `before`, once `count` of them are written: a streamed response's line is
    written after its last event reached the client, so reading at once can come too early."""
    deadline = time.monotonic() + timeout
    while len(records := audit_records(path)[before:]) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    return records


# ---- responsiveness --------------------------------------------------------------------------------
def test_health_answers_while_a_prompt_is_tokenized(gated):
    base, _, tokenizer, _ = gated
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(httpx.post, f"{base}/v1/completions", timeout=60,
                           json={"prompt": "SLOW to tokenize", "max_tokens": 2})
        assert tokenizer.entered.wait(30)
        # the tokenizer is busy with the slow prompt: the event loop is not
        assert httpx.get(f"{base}/health", timeout=60).status_code == 200
        assert httpx.get(f"{base}/v1/models", timeout=60).status_code == 200
        assert not slow.done()
        tokenizer.gate.set()
        assert slow.result().status_code == 200
    assert tokenizer.released_by_gate  # /health was answered while the encode still waited


def test_a_prompt_too_long_to_fit_is_refused_untokenized(gated, tiny_model_dir):
    base, engine, tokenizer, _ = gated
    per_token = longest_token_chars(load_tokenizer(tiny_model_dir))
    limit = engine.max_model_len * per_token
    assert 0 < per_token < 100
    tokenizer.encoded_lengths.clear()
    too_long = "a" * (limit + 1)
    with httpx.Client(base_url=base, timeout=60) as http:
        for path, body, param in (
                ("/v1/completions", {"prompt": too_long}, "prompt"),
                ("/v1/completions", {"prompt": ["short", too_long]}, "prompt"),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": too_long}]}, "messages"),
                ("/tokenize", {"prompt": too_long}, "prompt")):
            err = assert_error(http.post(path, json=body), 400, "maximum context length")
            assert err["code"] == "context_length_exceeded" and err["param"] == param
        assert not any(n > limit for n in tokenizer.encoded_lengths)  # never tokenized
        # token ids: their count is enough (no id is checked, nothing is queued)
        err = assert_error(http.post("/v1/completions", json={"prompt": [5] * engine.max_model_len}), 400,
                           "maximum context length")
        assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"
        # just under the bound it is tokenized, and the engine refuses it with the same code
        err = assert_error(http.post("/v1/completions", json={"prompt": "a" * limit}), 400, "maximum context length")
        assert err["code"] == "context_length_exceeded"
        assert limit in tokenizer.encoded_lengths


# ---- input validation ------------------------------------------------------------------------------
SURROGATE = "\ud800"
INVALID_INPUTS = [  # path, raw JSON body (Python's parser takes Infinity/NaN and lone surrogates), param
    ("/v1/completions", '{"prompt": "a\\ud800b"}', "prompt"),
    ("/v1/completions", '{"prompt": ["ok", "\\udfff"]}', "prompt"),
    ("/v1/completions", '{"prompt": "x", "stop": ["\\ud800"]}', "stop"),
    ("/v1/completions", '{"prompt": "x", "cache_salt": "\\ud800"}', "cache_salt"),
    ("/v1/completions", '{"prompt": "x", "logit_bias": {"\\ud800": 1}}', "logit_bias"),
    ("/tokenize", '{"prompt": "\\ud800"}', "prompt"),
    ("/tokenize", '{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages.0.content"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages.0.content"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
     "messages.0.content"),
    ("/v1/chat/completions", '{"messages": [{"role": "wizard", "content": "hi"}]}', "messages.0.role"),
    ("/tokenize", '{"messages": [{"role": "wizard", "content": "hi"}]}', "messages.0.role"),
    ("/v1/completions", '{"prompt": "x", "temperature": Infinity}', "temperature"),
    ("/v1/completions", '{"prompt": "x", "temperature": NaN}', "temperature"),
    ("/v1/completions", '{"prompt": "x", "top_p": -Infinity}', "top_p"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "presence_penalty": NaN}',
     "presence_penalty"),
    ("/v1/completions", '{"prompt": "x", "stop_token_ids": [1, 320]}', "stop_token_ids"),
    ("/v1/completions", '{"prompt": "x", "stop_token_ids": [-1]}', "stop_token_ids"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "stop_token_ids": [99999]}',
     "stop_token_ids"),
    ("/v1/completions", '{"prompt": [1, 2, 320]}', "prompt"),
    ("/v1/completions", '{"prompt": [[1, 2], [5, -3]]}', "prompt"),
    ("/detokenize", '{"tokens": [1, 320]}', "tokens"),
    ("/v1/completions", json.dumps({"prompt": "x", "stop": ["s"] * 65}), "stop"),
    ("/v1/completions", json.dumps({"prompt": "x", "stop": "s" * 257}), "stop"),
]


@pytest.mark.parametrize("path, body, param", INVALID_INPUTS)
def test_invalid_input_is_a_400_naming_the_field(gated, path, body, param):
    r = httpx.post(gated[0] + path, content=body.encode(), headers={"content-type": "application/json"}, timeout=60)
    err = assert_error(r, 400)
    assert err["param"] == param, err


def test_roles_and_bytes_at_the_door(gated):
    base = gated[0]
    with httpx.Client(base_url=base, timeout=60) as http:
        for role in ("system", "developer", "user", "assistant", "tool"):
            r = http.post("/tokenize", json={"messages": [{"role": role, "content": "hi"}]})
            assert r.status_code == 200, (role, r.text)
        # a body that is not UTF-8
        assert_error(http.post("/v1/completions", content=b'{"prompt": "\xff"}',
                               headers={"content-type": "application/json"}), 400)
        # the server still works
        ok = http.post("/v1/completions", json={"prompt": "fine", "max_tokens": 2, "stop": ["s"] * 64})
        assert ok.status_code == 200, ok.text


# ---- the audit log -------------------------------------------------------------------------------------
def test_every_request_gets_one_safe_capped_audit_line(gated):
    base, _, _, audit = gated
    before = len(audit_records(audit))
    huge = "m" * 1_000_000
    with httpx.Client(base_url=base, timeout=60) as http:
        r = http.post("/v1/completions", json={"model": huge, "prompt": "x"})
        err = assert_error(r, 404, "does not exist")
        assert len(r.content) < 2000 and "more chars" in err["message"]  # not echoed in full
        assert_error(http.post("/v1/completions", content=json.dumps({"model": SURROGATE, "prompt": "x"}),
                               headers={"content-type": "application/json"}), 400)
        assert_error(http.post("/v1/completions", json={"model": "no\nsuch", "prompt": "x"}), 404)
        assert_error(http.post("/v1/completions", content=b"{bad", headers={"content-type": "application/json"}), 400)
        assert_error(http.get("/" + "p" * 5000), 404)
        assert_error(http.get("/v1/completions"), 405)
        assert http.get("/health").status_code == 200  # /health is not audited: health checks would flood it
    records = audit_records(audit)[before:]
    assert [r["status_code"] for r in records] == [404, 400, 404, 400, 404, 405]
    assert [r["error"] for r in records] == ["model_not_found", "invalid_request_error", "model_not_found",
                                             "invalid_request_error", "invalid_request_error", "invalid_request_error"]
    assert records[0]["model"].startswith("m" * MAX_FIELD_CHARS) and len(records[0]["model"]) < 2 * MAX_FIELD_CHARS
    assert records[2]["model"] == "no\nsuch"
    assert len(records[4]["endpoint"]) < 2 * MAX_FIELD_CHARS
    with open(audit, "rb") as f:
        assert max(len(line) for line in f) < 4000


def test_audit_log_file_is_private_and_never_raises(tmp_path, caplog):
    path = tmp_path / "audit.jsonl"
    path.write_text("")
    os.chmod(path, 0o644)
    log = AuditLog(str(path))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # an existing file is made private
    rec = new_record("/v1/completions")
    rec.update(model="\ud800" + "x" * 10_000, identity="alice", finish_reason="stop")
    log.write(rec)
    log.write({"odd": object(), "bytes": b"\xff" * 1000})
    log.close()
    log.write(new_record("/late"))  # after close (a request cancelled late): still appended
    lines = path.read_bytes().splitlines()
    assert len(lines) == 3 and all(line.isascii() for line in lines)
    first = json.loads(lines[0])
    assert first["model"].startswith("\ud800xxx") and "more chars" in first["model"]
    assert json.loads(lines[2])["endpoint"] == "/late"
    fresh = tmp_path / "new.jsonl"
    AuditLog(str(fresh)).close()
    assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o600
    assert audit_line({"a": "\udfff"}) == '{"a": "\\udfff"}'


def test_keys_file_readable_by_others_is_warned_about(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("alice:sk-secret\n")
    os.chmod(keys, 0o644)
    warning = keys_file_warning(str(keys))
    assert warning and "its group and other users" in warning and "chmod 600" in warning
    assert "sk-secret" not in warning
    os.chmod(keys, 0o640)
    assert "its group" in keys_file_warning(str(keys))
    os.chmod(keys, 0o600)
    assert keys_file_warning(str(keys)) is None and keys_file_warning(None) is None
    assert load_identities(None, str(keys)).identify("Bearer sk-secret") == "alice"


# ---- engine failures ---------------------------------------------------------------------------------
def test_a_failed_step_is_a_500_for_its_request_only(gated, caplog, monkeypatch):
    base, engine, _, audit = gated
    before = len(audit_records(audit))
    calls = {"n": 0, "armed": False}

    def fault(*_):
        if calls["armed"]:
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("injected failure")

    runner = engine.engine.runner
    execute = runner.execute
    monkeypatch.setattr(runner, "execute", lambda sched: fault() or execute(sched))  # a step fails in the model
    try:
        body = {"prompt": "Hello", "max_tokens": 8, "temperature": 0.0, "ignore_eos": True}
        with caplog.at_level(logging.CRITICAL, logger="pagedserve.async_engine"), \
                httpx.Client(base_url=base, timeout=60) as http:
            calls.update(n=0, armed=True)
            err = assert_error(http.post("/v1/completions", json=body), 500, "injected failure")
            assert err["type"] == "server_error" and err["code"] == "request_failed"
            calls.update(n=0, armed=True)
            with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                assert r.status_code == 200
                events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            error = json.loads(events[-2])["error"]
            assert error["code"] == "request_failed" and "injected failure" in error["message"]
            calls.update(armed=False)
            ok = http.post("/v1/completions", json=body)  # the engine goes on
            assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 8
    finally:
        monkeypatch.undo()
    records = audit_records(audit)[before:]
    assert [(r["status_code"], r["error"]) for r in records] == [
        (500, "request_failed"), (500, "request_failed"), (200, None)]


def test_a_bug_mid_stream_ends_the_stream_as_an_openai_500(gated, caplog, monkeypatch):
    """Not a client disconnect (499): an OpenAI-shaped error event, [DONE], and a 500 in the audit."""
    from pagedserve.server.serving import OpenAIServing
    base, _, _, audit = gated
    before = len(audit_records(audit))

    def broken(*_args):
        raise KeyError("a bug")

    monkeypatch.setattr(OpenAIServing, "_delta_choices", broken)
    body = {"prompt": "Hello", "max_tokens": 4, "temperature": 0.0, "stream": True}
    with caplog.at_level(logging.CRITICAL, logger="pagedserve.server"), \
            httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "internal_error"
    assert [(x["status_code"], x["error"]) for x in new_audit_records(audit, before, 1)] == [(500, "internal_error")]
