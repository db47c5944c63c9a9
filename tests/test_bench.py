"""The benchmark tools: workload loading, metric math, FLOP counting, `bench throughput` on a tiny
model through the CLI, and `bench serve` against a stub OpenAI-compatible SSE server."""
from __future__ import annotations

import asyncio
import hashlib
import io
import itertools
import json
import math
import socket
import subprocess
import sys
import threading
import time

import pytest

from pagedserve.bench.flops import ModelShape, request_flops
from pagedserve.bench.metrics import RequestResult, serving_metrics, summarize
from pagedserve.bench.serve import arrival_times, run_serve_benchmark
from pagedserve.bench.multiturn import conversations
from pagedserve.bench.workload import WorkloadItem, item_from_dict, load_workload, workload_summary, write_workload
from pagedserve.cli import main

# sha256 of the original stand-alone workload script's stdout (`python workload.py KIND --n N --seed S`),
# which every benchmark figure in docs/ was measured on: the vendored generator must write the same bytes.
ORIGINAL_WORKLOAD_SHA256 = {
    ("chat", 5, 0): "977c553bc741481f37f043b5ab1bea4f7105fe788f6df43ee564144ebfe24ac7",
    ("shared", 12, 3): "16849f1fac585bfca68004547b9c712e31814ed8765bd35e1963091c10fe4905",
    ("chat", 128, 0): "ec0869df502375fce2202a09a226ac1ce439f90c448a62f64396e22ee046839a",    # the defaults
    ("shared", 128, 0): "0fe9eb90fe9dc503a28b39cf1609ceb5c1dfbb6318ef7a7c62cfe1d38716c1fa",
}


def _workload_text(kind: str, n: int, seed: int) -> str:
    buf = io.StringIO()
    write_workload(kind, buf, n=n, seed=seed)
    return buf.getvalue()


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


# ---- workload ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,n,seed", list(ORIGINAL_WORKLOAD_SHA256))
def test_vendored_workload_generator_writes_the_original_bytes(kind, n, seed):
    digest = hashlib.sha256(_workload_text(kind, n, seed).encode()).hexdigest()
    assert digest == ORIGINAL_WORKLOAD_SHA256[(kind, n, seed)]


def test_bench_workload_command_writes_the_same_bytes_on_stdout():
    out = subprocess.run([sys.executable, "-m", "pagedserve.cli", "bench", "workload", "shared", "--n", "12",
                          "--seed", "3"], check=True, capture_output=True).stdout
    assert hashlib.sha256(out).hexdigest() == ORIGINAL_WORKLOAD_SHA256[("shared", 12, 3)]
    with pytest.raises(SystemExit):
        main(["bench", "workload", "other"])


def test_load_workload_reads_the_generator_output(tmp_path):
    out = _workload_text("shared", 12, 3)
    lines = [json.loads(x) for x in out.splitlines()]
    path = tmp_path / "shared.jsonl"
    path.write_text(out)
    items = load_workload(str(path))
    assert [it.id for it in items] == [d["id"] for d in lines]
    assert [it.prompt_token_ids for it in items] == [d["prompt_token_ids"] for d in lines]
    assert [it.max_tokens for it in items] == [d["max_tokens"] for d in lines]
    assert [it.shared_prefix_len for it in items] == [d["shared_prefix_len"] for d in lines]
    assert load_workload(str(path), num_requests=5) == items[:5]
    s = workload_summary(items)
    assert s["prompt_tokens"] == sum(len(d["prompt_token_ids"]) for d in lines)
    assert s["output_tokens"] == sum(d["max_tokens"] for d in lines)
    assert s["shared_prefix_requests"] == sum(1 for d in lines if d["shared_prefix_len"])


def test_load_workload_rejects_malformed_lines(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt_token_ids": [1, 2], "max_tokens": 3}\n{"id": "b", "max_tokens": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        load_workload(str(bad))
    bad.write_text("not json\n")
    with pytest.raises(ValueError, match="not JSON"):
        load_workload(str(bad))


# ---- metric math ---------------------------------------------------------------------------
def test_summarize_percentiles_follow_linear_interpolation():
    s = summarize([0.004, 0.001, 0.003, 0.002], "x", percentiles=(50, 90, 99))
    assert s["mean_x_ms"] == pytest.approx(2.5)
    assert s["median_x_ms"] == pytest.approx(2.5)
    assert s["p50_x_ms"] == pytest.approx(2.5)
    assert s["p90_x_ms"] == pytest.approx(3.7)   # 1 + 0.9 * 3 ranks up the sorted [1, 2, 3, 4]
    assert s["p99_x_ms"] == pytest.approx(3.97)
    assert s["std_x_ms"] == pytest.approx(math.sqrt(1.25))
    assert summarize([], "x")["mean_x_ms"] is None


def test_serving_metrics_on_synthetic_timings():
    results = [
        RequestResult(True, prompt_len=10, output_tokens=5, ttft=0.1, itl=[0.05] * 4, latency=0.3),
        RequestResult(True, prompt_len=20, output_tokens=3, ttft=0.2, itl=[0.1, 0.1], latency=0.4),
        RequestResult(True, prompt_len=30, output_tokens=1, ttft=0.5, itl=[], latency=0.5),
        RequestResult(False, prompt_len=40, error="HTTP 400"),
    ]
    m = serving_metrics(results, duration_s=2.0)
    assert (m["completed"], m["failed"]) == (3, 1)
    assert m["total_input_tokens"] == 60 and m["total_output_tokens"] == 9
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_throughput"] == pytest.approx(4.5)
    assert m["total_token_throughput"] == pytest.approx(34.5)
    assert m["mean_ttft_ms"] == pytest.approx(800 / 3)
    assert m["median_ttft_ms"] == pytest.approx(200)
    # TPOT only for requests with more than one token: (0.3 - 0.1) / 4 and (0.4 - 0.2) / 2
    assert m["mean_tpot_ms"] == pytest.approx((50 + 100) / 2)
    # ITL pools every gap: four of 50 ms and two of 100 ms
    assert m["mean_itl_ms"] == pytest.approx((4 * 50 + 2 * 100) / 6)
    assert m["p99_itl_ms"] == pytest.approx(100)
    assert m["mean_e2el_ms"] == pytest.approx(400)
    assert m["mean_normalized_latency_s_per_token"] == pytest.approx((0.3 / 5 + 0.4 / 3 + 0.5 / 1) / 3)


def test_arrival_times_are_poisson_at_the_rate():
    assert arrival_times(4, math.inf) == [0.0] * 4
    t = arrival_times(4000, request_rate=8.0, seed=1)
    gaps = [b - a for a, b in itertools.pairwise(t)]
    assert t[0] == 0.0 and all(g >= 0 for g in gaps)
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 8, rel=0.08)
    # exponential gaps: the share above the mean is exp(-1)
    assert sum(g > 1 / 8 for g in gaps) / len(gaps) == pytest.approx(math.exp(-1), abs=0.04)
    assert arrival_times(10, 8.0, seed=1) == t[:10]
    with pytest.raises(ValueError):
        arrival_times(3, 0.0)


def test_request_flops_matches_a_token_by_token_count():
    shape = ModelShape(hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4, num_kv_heads=2,
                       head_dim=16, vocab_size=100)
    assert shape.layer_params == 3 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128)

    def brute(prompt, output, cached):
        total = 0
        for pos in range(cached, prompt + output - 1):  # every token fed through the model
            total += 2 * shape.layer_params + 4 * 3 * 4 * 16 * (pos + 1)
        return total + 2 * 100 * 64 * output          # LM head per sampled token

    for p, o, c in [(10, 1, 0), (10, 5, 0), (33, 7, 16), (1, 4, 0)]:
        assert request_flops(shape, p, o, c) == brute(p, o, c)


# ---- bench throughput on a tiny model -----------------------------------------------------
def test_bench_throughput_cli_on_a_tiny_model(tiny_model_dir, tmp_path, capsys):
    rows = [{"id": f"r{i}", "prompt_token_ids": [3 + (7 * i + 5 * j) % 300 for j in range(plen)],
             "max_tokens": mt, "shared_prefix_len": 0}
            for i, (plen, mt) in enumerate([(12, 5), (30, 8), (7, 3), (20, 6), (9, 4)])]
    wl = tmp_path / "w.jsonl"
    _write_jsonl(wl, rows)
    out = tmp_path / "result.json"
    rc = main(["bench", "throughput", "--workload", str(wl), "--num-requests", "4", "--model", tiny_model_dir,
               "--dtype", "float32", "--num-kv-blocks", "40", "--max-model-len", "128", "--compare-reservation",
               "--baseline", "hf", "--hf-batch-sizes", "1,3", "--save-result", str(out), "--quiet",
               "--profile-steps", "1:2", "--profile-out", str(tmp_path / "prof.txt")])
    assert rc == 0
    prof = (tmp_path / "prof.txt").read_text()
    assert "2 engine steps from step 1" in prof and "aten::" in prof
    printed = capsys.readouterr().out
    assert "out tok/s" in printed and "transformers static batch 3" in printed
    r = json.loads(out.read_text())
    used = rows[:4]
    want_out, want_prompt = sum(x["max_tokens"] for x in used), sum(len(x["prompt_token_ids"]) for x in used)
    assert r["workload"]["num_requests"] == 4 and r["machine"]["cpu_count"] and r["date"] and r["command"]

    runs = {e["kv_reservation"]: e for e in r["engine_runs"]}
    assert set(runs) == {"none", "max_model_len"}
    assert [e["profiled"] for e in r["engine_runs"]] == [True, False]
    for e in runs.values():
        assert e["output_tokens"] == e["expected_output_tokens"] == want_out
        assert e["prompt_tokens"] == want_prompt and e["total_tokens"] == want_out + want_prompt
        assert e["output_tokens_per_s"] == pytest.approx(want_out / e["elapsed_s"])
        assert e["requests_per_s"] == pytest.approx(4 / e["elapsed_s"])
        assert e["num_kv_blocks"] == 40 and 0 < e["kv_blocks_peak"] <= 40
        assert 0 < e["kv_utilization_mean"] <= 1 and e["num_preemptions"] >= 0 and e["gflop_per_s"] > 0
        assert 1 <= e["mean_running_requests"] <= 4
    # a whole 128-token window (8 blocks) per request: 40 blocks admit 5, so all 4 run, in more blocks
    assert runs["max_model_len"]["kv_blocks_peak"] == 4 * 8 > runs["none"]["kv_blocks_peak"]
    assert runs["none"]["kv_utilization_mean"] > runs["max_model_len"]["kv_utilization_mean"]

    hf = {h["batch_size"]: h for h in r["hf"]["runs"]}
    assert set(hf) == {1, 3}
    assert all(h["output_tokens"] == want_out for h in hf.values())  # useful tokens only
    assert hf[1]["generated_tokens_incl_padding"] == want_out
    assert hf[3]["generated_tokens_incl_padding"] == 3 * 8 + 6       # each batch runs to its longest
    best = max(hf.values(), key=lambda h: h["output_tokens_per_s"])
    assert r["ratios"]["hf_best_batch_size"] == best["batch_size"]
    assert r["ratios"]["ours_over_hf_best_static"] == pytest.approx(
        r["engine_runs"][0]["output_tokens_per_s"] / best["output_tokens_per_s"])
    assert r["ratios"]["paged_over_max_model_len_reservation"] == pytest.approx(
        runs["none"]["output_tokens_per_s"] / runs["max_model_len"]["output_tokens_per_s"])


# ---- bench serve against a stub server ----------------------------------------------------
FIRST_DELAY, TOKEN_DELAY = 0.15, 0.03


def _stub_app(state: dict):
    """An OpenAI-style completions endpoint that streams max_tokens chunks at known delays."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": "stub-model", "object": "model"}]})

    async def completions(request):
        body = await request.json()
        state["payloads"].append(body)
        if body["max_tokens"] > 100:
            return JSONResponse({"error": {"message": "too long", "type": "invalid_request_error"}}, status_code=400)
        with_usage = request.url.path.startswith("/v1") and body.get("stream_options", {}).get("include_usage")

        async def stream():
            state["in_flight"] += 1
            state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
            try:
                for i in range(body["max_tokens"]):
                    await asyncio.sleep(FIRST_DELAY if i == 0 else TOKEN_DELAY)
                    yield f"data: {json.dumps({'choices': [{'index': 0, 'text': f't{i}', 'finish_reason': None}]})}\n\n"
                yield f"data: {json.dumps({'choices': [{'index': 0, 'text': '', 'finish_reason': 'length'}]})}\n\n"
                if with_usage:
                    usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": body["max_tokens"]}
                    yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                state["in_flight"] -= 1

        return StreamingResponse(stream(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/models", models), Route("/v1/completions", completions, methods=["POST"]),
                             Route("/nousage/v1/completions", completions, methods=["POST"])])


@pytest.fixture()
def stub_server():
    import uvicorn
    state = {"payloads": [], "in_flight": 0, "max_in_flight": 0}
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(_stub_app(state), log_level="error"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", state
    server.should_exit = True
    thread.join(timeout=5)
    sock.close()


def _items(lengths):
    return [WorkloadItem(f"s{i}", list(range(1, 6 + i)), n) for i, n in enumerate(lengths)]


def test_bench_serve_counts_and_latencies_against_a_stub(stub_server):
    url, state = stub_server
    lengths = [4, 6, 2, 5, 1, 3]
    items = _items(lengths) + [WorkloadItem("too-long", [1, 2, 3], 500)]
    r = run_serve_benchmark(url, items, max_concurrency=3)
    assert (r["completed"], r["failed"]) == (6, 1) and "HTTP 400" in r["errors"][0]
    assert r["model"] == "stub-model"
    assert r["total_output_tokens"] == sum(lengths)
    assert r["total_input_tokens"] == sum(len(it.prompt_token_ids) for it in items[:6])
    assert state["max_in_flight"] <= 3
    p = state["payloads"][0]
    assert p["model"] == "stub-model" and p["prompt"] == items[0].prompt_token_ids and p["stream"] is True
    assert p["max_tokens"] == p["min_tokens"] == 4 and p["ignore_eos"] is True
    assert p["stream_options"] == {"include_usage": True}
    # known server delays give known latencies (generous upper slack: two shared cores)
    assert FIRST_DELAY <= r["mean_ttft_ms"] / 1000 < FIRST_DELAY + 0.2
    assert TOKEN_DELAY <= r["median_tpot_ms"] / 1000 < TOKEN_DELAY + 0.05
    assert TOKEN_DELAY * 0.9 <= r["median_itl_ms"] / 1000 < TOKEN_DELAY + 0.05
    e2e = sorted(r["per_request"]["e2els"][:6])
    want = sorted(FIRST_DELAY + (n - 1) * TOKEN_DELAY for n in lengths)
    assert all(w <= got < w + 0.25 for got, w in zip(e2e, want))
    assert r["mean_normalized_latency_s_per_token"] == pytest.approx(
        sum(l / n for l, n in zip(r["per_request"]["e2els"][:6], lengths)) / 6)


def test_bench_serve_without_usage_counts_chunks_and_honours_concurrency(stub_server):
    url, state = stub_server
    lengths = [3, 5, 2, 4]
    r = run_serve_benchmark(url, _items(lengths), endpoint="/nousage/v1/completions", model="m", max_concurrency=1)
    assert r["completed"] == 4 and r["total_output_tokens"] == sum(lengths)
    assert state["max_in_flight"] == 1 and state["payloads"][0]["model"] == "m"
    # one at a time: the run lasts at least the sum of the requests' own latencies
    assert r["duration_s"] >= sum(FIRST_DELAY + (n - 1) * TOKEN_DELAY for n in lengths)


def test_bench_serve_cli_poisson_arrivals(stub_server, tmp_path, capsys):
    url, _ = stub_server
    wl = tmp_path / "w.jsonl"
    _write_jsonl(wl, [{"id": f"q{i}", "prompt_token_ids": [5, 6, 7], "max_tokens": 2} for i in range(8)])
    out = tmp_path / "serve.json"
    rc = main(["bench", "serve", "--base-url", url, "--workload", str(wl), "--request-rate", "4",
               "--seed", "1", "--save-result", str(out)])
    assert rc == 0
    assert "TTFT ms" in capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["completed"] == 8 and r["request_rate"] == 4 and r["date"] and r["machine"]["cpu"]
    planned = arrival_times(8, 4.0, seed=1)
    assert planned[-1] > 0.5  # the schedule spreads the requests out
    for started, at in zip(r["per_request"]["start_times"], planned):
        assert at <= started < at + 0.3  # never early; late only by event-loop lag


def test_bench_throughput_measures_its_peak_and_runs_a_vllm_baseline(tiny_model_dir, tmp_path, capsys):
    """--baseline vllm runs vllm_runner.py under --vllm-python with the same requests and our settings, and
    prints the ratio. vLLM itself is not installed here: a stand-in interpreter checks the command it is
    given, answers as vllm_runner.py does, and fails the run if anything differs."""
    rows = [{"id": f"r{i}", "prompt_token_ids": [3 + i, 4, 5 + i], "max_tokens": 4, "shared_prefix_len": 0}
            for i in range(3)]
    wl = tmp_path / "w.jsonl"
    _write_jsonl(wl, rows)
    fake = tmp_path / "fake_python"
    fake.write_text(f"""#!{sys.executable}
import json, os, sys
runner, args = sys.argv[1], sys.argv[2:]
opt = dict(zip(args[::2], args[1::2]))
items = [json.loads(line) for line in open(opt["--workload"])]
ok = (runner.endswith("vllm_runner.py") and opt["--model"] == {tiny_model_dir!r} and opt["--dtype"] == "float32"
      and opt["--kv-gib"] == "1" and opt["--max-num-batched-tokens"] == "64" and opt["--max-model-len"] == "128"
      and os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0-0" and [it["max_tokens"] for it in items] == [4, 4, 4])
if not ok:
    sys.exit("unexpected command: " + " ".join(sys.argv))
print(json.dumps({{"engine": "vllm-cpu", "vllm_version": "0.0-fake", "dtype": "float32", "kv_gib": 1,
                  "num_requests": 3, "elapsed_s": 2.0, "prompt_tokens": 9, "output_tokens": 12,
                  "expected_output_tokens": 12, "output_tokens_per_s": 6.0, "total_tokens_per_s": 10.5}}))
""")
    fake.chmod(0o755)
    out = tmp_path / "result.json"
    rc = main(["bench", "throughput", "--workload", str(wl), "--model", tiny_model_dir, "--dtype", "float32",
               "--num-threads", "1", "--max-num-batched-tokens", "64", "--max-model-len", "128",
               "--baseline", "vllm", "--vllm-python", str(fake), "--save-result", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    r = json.loads(out.read_text())
    assert r["peak_source"] == "measured" and r["peak_gflops"] > 0
    assert f"matrix peak of this machine is {r['peak_gflops']:.0f} GFLOP/s, measured here" in printed
    assert r["vllm"]["output_tokens_per_s"] == 6.0
    assert r["ratios"]["ours_over_vllm"] == pytest.approx(r["engine_runs"][0]["output_tokens_per_s"] / 6.0)
    assert "vLLM CPU 0.0-fake" in printed and "pagedserve / vLLM's CPU build" in printed
    # a peer that fails is a warning and a non-zero exit, not a crash
    fake.write_text(f"#!{sys.executable}\nimport sys\nsys.exit('no vllm here')\n")
    rc = main(["bench", "throughput", "--workload", str(wl), "--model", tiny_model_dir, "--dtype", "float32",
               "--num-threads", "1", "--peak-gflops", "100", "--baseline", "vllm", "--vllm-python", str(fake),
               "--save-result", str(out), "--quiet"])
    assert rc == 1 and "vLLM did not run" in capsys.readouterr().out


# ---- bench multiturn on a tiny model -------------------------------------------------------
def test_multiturn_workload_is_conversations_of_turns():
    # The default file, on which docs/PERFORMANCE.md's multi-turn figures were measured, never changes.
    assert hashlib.sha256(_workload_text("multiturn", 32, 0).encode()).hexdigest() == (
        "60638ea647a5555ecf8d4fd684e6f293fa52ab69fdca1b9944edf6632e0f9fa2")
    rows = [json.loads(line) for line in _workload_text("multiturn", 5, 2).splitlines()]
    items = [item_from_dict(r, i + 1) for i, r in enumerate(rows)]
    convs = conversations(items)
    assert [c.id for c in convs] == [f"mt-{i}" for i in range(5)]
    system = convs[0].turns[0].prompt_token_ids[:128]
    for c in convs:
        assert 3 <= len(c.turns) <= 8 and [t.turn for t in c.turns] == list(range(len(c.turns)))
        assert c.turns[0].prompt_token_ids[:128] == system and c.turns[0].shared_prefix_len == 128
        assert all(t.shared_prefix_len == 0 and 8 <= len(t.prompt_token_ids) <= 256 for t in c.turns[1:])
    with pytest.raises(ValueError, match="names no conversation"):
        conversations([WorkloadItem("x", [1, 2], 3)])


def test_bench_multiturn_cli_tier_and_swap_answer_alike(tiny_model_dir, tmp_path, capsys):
    """Eight conversations whose histories outgrow a 24-block pool: the tier restores what recompute computes
    again, swap preempts without recompute, and every mode gives the same answers."""
    rows = []
    for r in (json.loads(line) for line in _workload_text("multiturn", 8, 1).splitlines()):
        if r["turn"] < 4:  # at most 4 turns, and every id folded into the tiny vocabulary
            r["prompt_token_ids"] = [3 + t % 300 for t in r["prompt_token_ids"][:40]]
            r["max_tokens"] = min(r["max_tokens"], 12)
            rows.append(r)
    wl = tmp_path / "mt.jsonl"
    _write_jsonl(wl, rows)
    out = tmp_path / "mt.json"
    rc = main(["bench", "multiturn", "--workload", str(wl), "--model", tiny_model_dir, "--dtype", "float32",
               "--num-kv-blocks", "24", "--kv-offload-memory", "4MiB", "--concurrency", "8",
               "--save-result", str(out), "--quiet"])
    assert rc == 0
    assert "every mode gave the same answers" in capsys.readouterr().out
    r = json.loads(out.read_text())
    runs = {x["mode"]: x for x in r["runs"]}
    assert set(runs) == {"none", "tier", "swap"} and len({x["answers_sha256"] for x in r["runs"]}) == 1
    turns = len(rows)
    for x in runs.values():
        assert x["num_turns"] == turns and x["num_conversations"] == 8
        assert x["output_tokens"] == sum(row["max_tokens"] for row in rows)
        assert x["working_set_blocks"] > x["num_kv_blocks"]  # the histories do not fit the pool
        assert 0 < x["ttft_mean_s"] <= x["turn_latency_mean_s"]
    assert runs["none"]["kv_offload_hits"] == 0
    assert runs["tier"]["kv_offload_hits"] > 0
    assert runs["tier"]["prefill_tokens_computed"] < runs["none"]["prefill_tokens_computed"]
    assert runs["swap"]["num_swapped_out"] > 0
