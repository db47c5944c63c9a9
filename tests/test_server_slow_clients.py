"""Slow and greedy clients, over real sockets: headers or a body dribbled byte by byte are cut off with
a 408 (and audited), idle connections are closed, connections over --max-connections get an
OpenAI-shaped 503, and no log line ever shows a query string (where a client may put its key)."""
from __future__ import annotations

import argparse
import json
import logging
import socket
import time

import httpx
import pytest

from pagedserve.server.args import add_server_args, server_config
from test_server import assert_error, running_server

DRIBBLE_S = 0.1  # between two bytes of a slow client
TIMEOUT_S = 0.5  # the header and body read timeouts of these servers


def flags(*argv: str):
    parser = argparse.ArgumentParser()
    add_server_args(parser)
    return server_config(parser.parse_args(list(argv)))


@pytest.fixture(scope="module")
def strict(tiny_model_dir, tmp_path_factory):
    """A server with short read timeouts and an audit log: (host, port, audit path)."""
    audit = str(tmp_path_factory.mktemp("audit") / "audit.jsonl")
    config = flags("--header-read-timeout", str(TIMEOUT_S), "--body-read-timeout", str(TIMEOUT_S),
                   "--audit-log", audit)
    assert (config.header_read_timeout, config.body_read_timeout) == (TIMEOUT_S, TIMEOUT_S)
    with running_server(tiny_model_dir, config) as (base, _):
        host, port = base.removeprefix("http://").split(":")
        yield host, int(port), audit


def audit_records(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def dribble(sock: socket.socket, data: bytes) -> tuple[int, bytes]:
    """Send data one byte every DRIBBLE_S until the server closes; (bytes sent, what it answered)."""
    sock.settimeout(DRIBBLE_S)
    answer, sent = b"", 0
    for i in range(len(data)):
        try:
            sock.sendall(data[i:i + 1])
            sent += 1
        except (BrokenPipeError, ConnectionResetError):
            break
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            break
        if not chunk:  # closed
            break
        answer += chunk
    sock.settimeout(5)
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except (socket.timeout, ConnectionResetError):
        pass
    return sent, answer


def error_of(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["error"]


HEAD = b"POST /v1/completions HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n"
SLOW_HEADERS = HEAD + b"x-padding: " + b"p" * 200 + b"\r\n\r\n"


def test_dribbled_headers_are_cut_off(strict):
    host, port, audit = strict
    before = len(audit_records(audit))
    with socket.create_connection((host, port)) as sock:
        sent, answer = dribble(sock, SLOW_HEADERS)
    assert sent < len(SLOW_HEADERS)  # the server closed before the client was done
    status, error = error_of(answer)
    assert status == 408 and error["code"] == "request_timeout" and "--header-read-timeout" in error["message"]
    records = audit_records(audit)[before:]
    assert [(r["endpoint"], r["status_code"], r["error"]) for r in records] == [(None, 408, "request_timeout")]


def test_dribbled_headers_after_a_kept_alive_request_are_cut_off(strict):
    host, port, audit = strict
    with socket.create_connection((host, port)) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nhost: test\r\n\r\n")
        sock.settimeout(10)
        first = b""
        while b"\r\n\r\n" not in first or not first.rstrip().endswith(b"}"):
            first += sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        sent, answer = dribble(sock, SLOW_HEADERS)  # the next request on the same connection
    assert sent < len(SLOW_HEADERS) and error_of(answer)[0] == 408


def test_silent_connection_is_closed_without_an_answer(strict):
    host, port, audit = strict
    before = len(audit_records(audit))
    with socket.create_connection((host, port)) as sock:
        sock.settimeout(30)
        assert sock.recv(65536) == b""  # closed (after the header timeout), nothing said
    assert len(audit_records(audit)) == before  # no request, no line


def test_dribbled_body_is_cut_off_and_audited(strict):
    host, port, audit = strict
    before = len(audit_records(audit))
    body = json.dumps({"prompt": "x" * 100, "max_tokens": 1}).encode()
    with socket.create_connection((host, port)) as sock:
        sock.sendall(HEAD + b"content-length: %d\r\n\r\n" % len(body))
        sent, answer = dribble(sock, body)
    assert sent < len(body)
    status, error = error_of(answer)
    assert status == 408 and error["code"] == "request_timeout" and "--body-read-timeout" in error["message"]
    assert b"connection: close" in answer.lower()
    records = audit_records(audit)[before:]
    assert [(r["endpoint"], r["status_code"], r["error"]) for r in records] == [
        ("/v1/completions", 408, "request_timeout")]


def test_a_body_still_dribbling_after_a_401_is_cut_off(tiny_model_dir):
    config = flags("--api-key", "sk-real", "--body-read-timeout", str(TIMEOUT_S))
    with running_server(tiny_model_dir, config) as (base, _):
        host, port = base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(HEAD + b"transfer-encoding: chunked\r\n\r\n")
            sent, answer = dribble(sock, b"1\r\nx\r\n" * 100)  # never ends
    assert answer.startswith(b"HTTP/1.1 401") and sent < 100  # closed soon after the timeout, not held


def read_response(sock: socket.socket) -> bytes:
    """One whole response with a content-length (head and body), however the bytes arrive."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.lower().split(b"\r\n") if line.startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def after_an_early_401(tiny_model_dir: str, tmp_path, then: bytes, *flag_args: str) -> tuple[bytes, float, list]:
    """A chunked POST without a key gets its 401 before its body is read; the client then sends `then` and
    waits. Returns (whatever the server sent after the 401, seconds until it closed, audit statuses)."""
    audit = tmp_path / "audit.jsonl"
    config = flags("--api-key", "sk-real", "--audit-log", str(audit), *flag_args)
    with running_server(tiny_model_dir, config) as (base, _):
        host, port = base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(HEAD + b"transfer-encoding: chunked\r\n\r\n")
            sock.settimeout(10)
            assert read_response(sock).startswith(b"HTTP/1.1 401")
            sock.sendall(then)
            start, rest = time.monotonic(), b""
            while chunk := sock.recv(65536):
                rest += chunk
            waited = time.monotonic() - start
    return rest, waited, [r["status_code"] for r in audit_records(str(audit))]


def test_a_body_finished_after_a_401_then_silence_is_closed(tiny_model_dir, tmp_path):
    """The body completes after the early 401, then the client goes quiet: the connection is back to
    waiting for a request, on the header clock (not held forever, not answered twice)."""
    rest, waited, statuses = after_an_early_401(
        tiny_model_dir, tmp_path, b"1\r\nx\r\n0\r\n\r\n",  # the rest of the body, then nothing
        "--header-read-timeout", str(TIMEOUT_S), "--body-read-timeout", "30")
    assert rest == b"" and waited < 9  # closed by the header timeout, nothing more said
    assert statuses == [401]


def test_a_malformed_body_after_a_401_gets_no_second_answer(tiny_model_dir, tmp_path):
    rest, _, statuses = after_an_early_401(tiny_model_dir, tmp_path, b"zz-not-a-chunk-size\r\n")
    assert rest == b"" and statuses == [401]  # closed, without a raw 400 on top of the 401


def test_malformed_request_gets_an_openai_400_and_a_line(strict):
    host, port, audit = strict
    before = len(audit_records(audit))
    with socket.create_connection((host, port)) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        sock.settimeout(10)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status, error = error_of(answer)
    assert status == 400 and error["code"] == "invalid_http_request"
    assert [(r["endpoint"], r["status_code"]) for r in audit_records(audit)[before:]] == [(None, 400)]


def test_a_request_sent_in_time_is_served(strict):
    host, port, _ = strict
    r = httpx.post(f"http://{host}:{port}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200


def test_connections_over_the_limit_get_503(tiny_model_dir, tmp_path):
    audit = str(tmp_path / "audit.jsonl")
    config = flags("--max-connections", "2", "--audit-log", audit)
    with running_server(tiny_model_dir, config) as (base, _):
        host, port = base.removeprefix("http://").split(":")
        idle = [socket.create_connection((host, int(port))) for _ in range(2)]
        try:
            with httpx.Client(base_url=base, timeout=30) as http:  # a third connection
                err = assert_error(http.get("/v1/models"), 503, "--max-connections 2")
                assert err["code"] == "too_many_connections"
        finally:
            for s in idle:
                s.close()
        for _ in range(100):  # the server notices the two closed connections soon
            r = httpx.get(f"{base}/v1/models", timeout=30)
            if r.status_code == 200:
                break
            time.sleep(0.05)
        assert r.status_code == 200
    statuses = [(r["endpoint"], r["status_code"], r["error"]) for r in audit_records(audit)]
    assert statuses[0] == ("/v1/models", 503, "too_many_connections") and statuses[-1][1] == 200


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:  # attached to several loggers: each record once
        if not any(r is record for r in self.records) and not record.name.startswith(("httpx", "httpcore")):
            self.records.append(record)

    @property
    def lines(self) -> list[str]:
        return [r.getMessage() for r in self.records]


@pytest.mark.parametrize("access_log", [False, True])
def test_no_log_line_shows_a_query_string(tiny_model_dir, access_log):
    config = flags("--api-key", "sk-real", *(["--enable-uvicorn-access-log"] if access_log else []))
    assert config.access_log == access_log
    collect = _Collect()
    names = ("", "uvicorn", "uvicorn.access", "uvicorn.error", "pagedserve.access")
    loggers = [logging.getLogger(name) for name in names]
    with running_server(tiny_model_dir, config) as (base, _):
        levels = [lg.level for lg in loggers]
        for lg in loggers:  # attached after start: uvicorn must not log access lines even so
            lg.addHandler(collect)
            lg.setLevel(logging.INFO)
        try:
            r = httpx.get(f"{base}/v1/models?api_key=sk-guessed-secret&x=1", timeout=30)
            assert_error(r, 401)
            ok = httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer sk-real"}, timeout=30)
            assert ok.status_code == 200
        finally:
            for lg, level in zip(loggers, levels):
                lg.removeHandler(collect)
                lg.setLevel(level)
    assert not any("sk-guessed-secret" in line or "api_key" in line for line in collect.lines), collect.lines
    access = [line for line in collect.lines if '"GET /v1/models HTTP/1.1"' in line]
    if access_log:
        assert [line.rsplit(" ", 1)[1] for line in access] == ["401", "200"]
    else:
        assert access == []


def test_timeout_flags_are_validated():
    cfg = flags()
    assert (cfg.header_read_timeout, cfg.body_read_timeout, cfg.max_connections, cfg.shutdown_timeout,
            cfg.access_log) == (10.0, 60.0, 1024, 5.0, False)
    cfg = flags("--header-read-timeout", "0", "--body-read-timeout", "0", "--max-connections", "0")
    assert cfg.header_read_timeout is None and cfg.body_read_timeout is None and cfg.max_connections is None
    for bad in (["--header-read-timeout", "-1"], ["--shutdown-timeout", "nan"], ["--body-read-timeout", "inf"],
                ["--max-connections", "-2"]):
        with pytest.raises(ValueError, match=bad[0]):
            flags(*bad)
    with pytest.raises(SystemExit):
        flags("--enable-uvicorn-access-log", "--disable-uvicorn-access-log")
