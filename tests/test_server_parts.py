"""The server's parts on their own: identities, options, metrics exposition, audit records, the banner;
and `pagedserve serve` itself, as `make run` starts it, in a subprocess."""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from pagedserve.server.app import usage_banner
from pagedserve.server.args import ServerConfig, add_server_args, server_config
from pagedserve.server.audit import AuditLog, finish_reason_of, new_record
from pagedserve.server.auth import ANONYMOUS, Identities, cache_salt, load_identities, parse_keys_file
from pagedserve.server.metrics import ServerMetrics


# ---- identities --------------------------------------------------------------------------------------
def test_keys_file_and_identify(tmp_path):
    f = tmp_path / "keys"
    f.write_text("# comment\n\nalice: sk-a:with:colons \nbob:sk-b\nalice:sk-a2\n")
    ids = load_identities(["cli-key"], str(f))
    assert ids.identify("Bearer cli-key") == "key-1"
    assert ids.identify("Bearer sk-a:with:colons") == "alice"
    assert ids.identify("bearer   sk-a2") == "alice"  # a name may hold several keys (rotation)
    assert ids.identify("Bearer sk-b") == "bob"
    for bad in (None, "", "Bearer", "Bearer ", "Basic sk-b", "Bearer sk-b2", "sk-b", "Bearer sk-"):
        assert ids.identify(bad) is None, bad
    assert Identities().identify(None) == ANONYMOUS and not Identities().required


@pytest.mark.parametrize("text, message", [
    ("alice\n", "line 1: expected `name:key`"),
    ("ok:k\n:nameless\n", "line 2"),
    ("ok:k\nempty:\n", "line 2"),
])
def test_malformed_keys_file(text, message):
    with pytest.raises(ValueError, match=message):
        parse_keys_file(text)


def test_key_errors_never_show_the_key(tmp_path):
    f = tmp_path / "keys"
    f.write_text("secretkeywithoutname\n")
    with pytest.raises(ValueError) as e:
        load_identities(None, str(f))
    assert "secretkeywithoutname" not in str(e.value)
    with pytest.raises(ValueError, match="more than once"):
        load_identities(["k", "k"])
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="no `name:key`"):
        load_identities(None, str(empty))


def test_cache_salt_isolates_identities():
    assert cache_salt("alice", None, False) != cache_salt("bob", None, False)
    assert cache_salt("alice", "s", False) != cache_salt("alice", None, False)
    assert cache_salt("alice", "s", False) != cache_salt("bob", "s", False)
    # no identity can reach another's cache through the request's own salt
    assert cache_salt("a", "b\x00c", False) != cache_salt("a\x00b", "c", False)
    assert cache_salt("a", '", "', False) != cache_salt('a", "', "", False)
    assert cache_salt("alice", None, True) is None and cache_salt("bob", "s", True) == "s"


def test_server_options():
    parser = argparse.ArgumentParser()
    add_server_args(parser)
    cfg = server_config(parser.parse_args([]))
    assert (cfg.host, cfg.port, cfg.shared_prefix_cache, cfg.audit_log) == ("127.0.0.1", 8000, False, None)
    assert not cfg.identities.required and cfg.max_waiting > 0
    cfg = server_config(parser.parse_args(["--api-key", "a", "--api-key", "b", "--shared-prefix-cache",
                                           "--max-waiting", "0", "--served-model-name", "m", "--port", "9000"]))
    assert cfg.identities.identify("Bearer b") == "key-2" and cfg.shared_prefix_cache
    assert cfg.max_waiting is None and cfg.served_model_names == ("m",) and cfg.port == 9000
    with pytest.raises(ValueError, match="port"):
        server_config(parser.parse_args(["--port", "70000"]))


# ---- metrics, audit, banner ---------------------------------------------------------------------------
def test_metrics_exposition_names_and_values():
    stats = {"kv_cache_usage": 0.25, "num_requests_running": 3, "num_requests_waiting": 2,
             "prefix_cache_queries": 100, "prefix_cache_hits": 40, "num_preemptions": 1,
             "prompt_tokens": 500, "generation_tokens": 70}
    metrics = ServerMetrics(lambda: stats)
    metrics.ttft.observe(0.05)
    text = metrics.render()[0].decode()
    expected = {"pagedserve:kv_cache_usage_perc": 0.25, "pagedserve:num_requests_running": 3,
                "pagedserve:num_requests_waiting": 2, "pagedserve:prefix_cache_queries_total": 100,
                "pagedserve:prefix_cache_hits_total": 40, "pagedserve:num_preemptions_total": 1,
                "pagedserve:prompt_tokens_total": 500, "pagedserve:generation_tokens_total": 70,
                "pagedserve:time_to_first_token_seconds_count": 1,
                "pagedserve:inter_token_latency_seconds_count": 0,
                "pagedserve:e2e_request_latency_seconds_count": 0}
    for name, value in expected.items():
        assert re.search(rf"^{re.escape(name)} {value}(\.0)?$", text, re.M), name
    for name, kind in (("kv_cache_usage_perc", "gauge"), ("num_requests_running", "gauge"),
                       ("prompt_tokens_total", "counter"), ("time_to_first_token_seconds", "histogram")):
        assert f"# TYPE pagedserve:{name} {kind}\n" in text
    stats["generation_tokens"] = 71  # read at scrape time
    assert "pagedserve:generation_tokens_total 71.0" in metrics.render()[0].decode()
    ServerMetrics(lambda: stats)  # a second registry in the same process is fine


def test_request_timer_observes_engine_timestamps():
    from pagedserve.outputs import RequestOutput
    metrics = ServerMetrics(dict)
    timer = metrics.tracker()

    def delta(first, last, finished=False):
        return RequestOutput("r", None, [1], [], finished, 0,
                             {"arrival_time": 10.0, "first_token_time": first, "last_token_time": last})

    timer.observe(delta(10.5, 10.5))
    timer.observe(delta(10.5, 10.7))
    timer.observe(delta(10.5, 10.7))  # no new step: nothing observed
    timer.observe(delta(10.5, 11.0, finished=True))
    assert metrics.ttft.collect()[0].samples[-2].value == pytest.approx(0.5)  # _sum
    itl = {s.name: s.value for s in metrics.itl.collect()[0].samples}
    assert itl["pagedserve:inter_token_latency_seconds_count"] == 2
    assert itl["pagedserve:inter_token_latency_seconds_sum"] == pytest.approx(0.5)
    e2e = {s.name: s.value for s in metrics.e2e.collect()[0].samples}
    assert e2e["pagedserve:e2e_request_latency_seconds_sum"] == pytest.approx(1.0)


def test_audit_log_lines(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path))
    rec = new_record("/v1/completions")
    rec.update(identity="alice", status_code=200, finish_reason=finish_reason_of(["stop", "length", "stop"]))
    log.write(rec)
    log.write(new_record("/metrics"))
    log.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["identity"] == "alice" and lines[0]["finish_reason"] == "length,stop"
    assert lines[1]["endpoint"] == "/metrics" and finish_reason_of([None]) is None


def test_banner_says_how_to_call():
    text = usage_banner(ServerConfig(host="0.0.0.0", port=8123), "SmolLM2-135M-Instruct")
    assert "http://127.0.0.1:8123/v1" in text and "curl http://127.0.0.1:8123/v1/chat/completions" in text
    assert '"model": "SmolLM2-135M-Instruct"' in text and "Authorization" not in text
    keyed = usage_banner(ServerConfig(identities=load_identities(["sekrit"])), "m")
    assert "Authorization: Bearer $API_KEY" in keyed and "sekrit" not in keyed


# ---- the real command ----------------------------------------------------------------------------------
def test_pagedserve_serve_command(tiny_model_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    audit = tmp_path / "audit.jsonl"
    cmd = [sys.executable, "-m", "pagedserve.cli", "serve", "--model", tiny_model_dir, "--port", str(port),
           "--num-kv-blocks", "64", "--dtype", "float32", "--api-key", "k1", "--audit-log", str(audit),
           "--served-model-name", "tiny", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        lines = []
        deadline = time.monotonic() + 90
        while not any("curl" in line for line in lines):
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "".join(lines)
            lines.append(line)
        banner = "".join(lines)
        assert f"http://127.0.0.1:{port}/v1" in banner and "'tiny'" in banner and "k1" not in banner
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", headers={"Authorization": "Bearer k1"},
                       json={"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
                       timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3
        assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0
    assert json.loads(audit.read_text().splitlines()[0])["identity"] == "key-1"
