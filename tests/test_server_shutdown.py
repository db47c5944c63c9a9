"""A clean shutdown: new requests are refused at once, running ones get --shutdown-timeout seconds to
finish, the rest end with an OpenAI-shaped error (streams with an error event and [DONE]), every
request keeps its audit line, and the process exits."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from conftest import build_tiny_hf_model
from pagedserve.async_engine import AsyncEngine
from pagedserve.engine import LLMEngine
from pagedserve.server.app import build_app
from pagedserve.server.args import ServerConfig
from pagedserve.server.lifecycle import FINISH_MARGIN_S
from test_server import ENGINE, serve_in_thread

GREEDY = {"prompt": "Hello", "temperature": 0.0, "ignore_eos": True}


async def stream_events(http: httpx.AsyncClient, body: dict, first: asyncio.Event | None = None) -> list:
    """The data payloads of an SSE completion stream (JSON decoded, "[DONE]" as is)."""
    events = []
    async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                events.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
                if first is not None:
                    first.set()
    return events


def test_shutdown_drains_then_ends_the_rest(tiny_model_dir, tmp_path):
    audit = tmp_path / "audit.jsonl"
    grace = 2.0
    config = ServerConfig(audit_log=str(audit), shutdown_timeout=grace)
    engine = AsyncEngine(LLMEngine(model=tiny_model_dir, **ENGINE), max_waiting=config.max_waiting)
    # every step takes at least 20 ms: 240 tokens outlast the grace period, 20 do not
    runner = engine.engine.runner
    execute = runner.execute
    runner.execute = lambda sched: time.sleep(0.02) or execute(sched)
    app = build_app(engine, config)
    server, thread, sock, base = serve_in_thread(app, config)
    stopped_at = {}

    async def main():
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            long_stream = asyncio.create_task(stream_events(http, {**GREEDY, "max_tokens": 240}))
            short_stream = asyncio.create_task(stream_events(http, {**GREEDY, "max_tokens": 20}))
            long_plain = asyncio.create_task(http.post("/v1/completions", json={**GREEDY, "max_tokens": 240}))
            for _ in range(1000):  # all three run
                if engine.stats()["num_requests_running"] == 3:
                    break
                await asyncio.sleep(0.01)
            assert engine.stats()["num_requests_running"] == 3
            stopped_at["t"] = time.monotonic()
            server.should_exit = True  # what SIGINT/SIGTERM do
            for _ in range(1000):
                if app.state.lifecycle.draining:
                    break
                await asyncio.sleep(0.01)
            late = await http.post("/v1/completions", json={**GREEDY, "max_tokens": 2})  # a new connection
            return await long_stream, await short_stream, await long_plain, late

    long_events, short_events, plain, late = asyncio.run(main())
    thread.join(grace + FINISH_MARGIN_S + 10)
    assert not thread.is_alive()
    assert time.monotonic() - stopped_at["t"] < grace + FINISH_MARGIN_S
    sock.close()
    # running when the shutdown began, done within the grace period: complete
    assert short_events[-1] == "[DONE]" and short_events[-2]["choices"][0]["finish_reason"] == "length"
    # still running at its end: an error event, then [DONE]
    assert long_events[-1] == "[DONE]" and long_events[-2]["error"]["code"] == "engine_unavailable"
    assert "shutting down" in long_events[-2]["error"]["message"]
    assert not any(e["choices"][0]["finish_reason"] for e in long_events[:-2])
    assert plain.status_code == 503 and "shutting down" in plain.json()["error"]["message"]
    assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
    assert late.headers["connection"] == "close"
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert sorted((r["status_code"], r["error"]) for r in records) == [
        (200, None), (503, "engine_unavailable"), (503, "engine_unavailable"), (503, "shutting_down")]
    assert app.state.audit_log._file.closed and not engine.is_running


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("tiny_long_llama"))
    build_tiny_hf_model(folder, "llama", max_position_embeddings=2048)
    return folder


def test_sigterm_ends_streams_with_done_and_keeps_the_audit(long_model_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    audit, keys = tmp_path / "audit.jsonl", tmp_path / "keys"
    keys.write_text("alice:sk-alice\n")
    os.chmod(keys, 0o644)
    grace = 1.0
    cmd = [sys.executable, "-m", "pagedserve.cli", "serve", "--model", long_model_dir, "--port", str(port),
           "--num-kv-blocks", "300", "--block-size", "8", "--dtype", "float32", "--audit-log", str(audit),
           "--api-keys-file", str(keys), "--shutdown-timeout", str(grace), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    output: list[str] = []
    try:
        deadline = time.monotonic() + 90
        while not any("curl" in line for line in output):
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "".join(output)
            assert time.monotonic() < deadline, "".join(output)
            output.append(line)
        threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True).start()  # keep the pipe drained
        assert "readable by its group and other users" in "".join(output)  # the keys file's mode
        events = []
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                          headers={"Authorization": "Bearer sk-alice"},
                          json={**GREEDY, "max_tokens": 2000, "stream": True}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
                if len(events) == 1:
                    proc.send_signal(signal.SIGTERM)
                    sent = time.monotonic()
        proc.wait(grace + FINISH_MARGIN_S + 10)
        exited = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode in (0, -signal.SIGTERM), "".join(output)
    assert exited < grace + FINISH_MARGIN_S + 5, exited
    assert events[-1] == "[DONE]"  # never cut off: complete, or an error event then [DONE]
    if events[-2].get("error") is not None:
        assert events[-2]["error"]["code"] == "engine_unavailable"
    else:
        assert events[-2]["choices"][0]["finish_reason"] == "length"
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(r["identity"], r["endpoint"]) for r in records] == [("alice", "/v1/completions")]
    assert records[0]["status_code"] in (200, 503) and records[0]["completion_tokens"] >= 1
    assert "I/O operation on closed file" not in "".join(output) and "Traceback" not in "".join(output)
