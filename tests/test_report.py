"""`pagedserve bench report` end to end on a tiny random-weight model (reduced plan, real server
subprocesses), plus the report's pure helpers: static-batch sizing, knee finding, flags, workloads."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest

from benchmarks.report import FULL, QUICK, plan_from_args
from benchmarks.report_runs import (
    generator_kwargs,
    largest_static_batch,
    static_batch_cache_tokens,
    workload_items,
)
from benchmarks.report_server import (
    engine_flags,
    rates_from_capacity,
    sustainable_rate,
)
from pagedserve.bench.workload import WorkloadItem
from pagedserve.cli import build_parser, engine_config, main
from pagedserve.config import EngineConfig

REPO = Path(__file__).resolve().parents[1]
BUDGETS = (16, 64)  # blocks of 16 tokens; the tiny model's 256-token window is 16 blocks
PNGS = ("memory.png", "budgets.png", "prefix.png", "sampling.png", "latency.png", "recompute.png", "beam.png",
        "tier.png", "swap.png")
SECTIONS = 9


@pytest.fixture(scope="module")
def report(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    argv = ["bench", "report", "--model", tiny_model_dir, "--dtype", "float32", "--num-threads", "1",
            "--out", str(out), "--workload-scale", "0.1", "--quiet",
            # a step budget of 64 tokens admits the requests over several steps, as a stream of arrivals would:
            # a prefix computed in one step is shared from the next on (never within the step computing it)
            "--max-num-batched-tokens", "64",
            "--chat-requests", "8", "--budgets", ",".join(map(str, BUDGETS)), "--hf-budgets", "64",
            "--shared-requests", "8", "--sampling-prompts", "2", "--sampling-ns", "2,4",
            "--serve-requests", "5", "--rate-multipliers", "0.5,4", "--recompute-lengths", "16,64",
            "--beam-prompts", "2", "--beam-widths", "2,4",
            "--tier-conversations", "4", "--tier-concurrency", "4", "--tier-pool-blocks", "16",
            "--swap-block-sizes", "8,16", "--swap-requests", "6", "--swap-pool-tokens", "48",
            "--swap-context-tokens", "64", "--kv-offload-memory", "8MiB"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["/venv/bin/pagedserve", *argv])  # as the console script sees it
        assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    return out, results, (out / "README.md").read_text()


def test_report_writes_plots_and_a_readme_with_every_section(report):
    out, results, readme = report
    for name in PNGS:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
        assert f"]({name})" in readme
    for n in range(1, SECTIONS + 1):
        section = re.search(rf"^## {n}\. .*?(?=^## )", readme, re.DOTALL | re.MULTILINE)
        assert section, f"section {n} missing"
        body = section.group(0)
        assert "**The paper.**" in body and "**Measured.**" in body
        assert re.search(r"\*\*Verdict: (held|partly held|did not hold|not shown)\.\*\*", body)
        assert re.search(r"\d+\.\d", body), f"section {n} has no numbers"
    assert results["command"].startswith(f"pagedserve bench report --model {results['engine']['model']}")
    assert f"`{results['command']}`" in readme
    assert results["date"] in readme and results["machine"]["cpu"] in readme
    assert results["threads"] == 1 and "load average" in readme.lower()
    assert results["model"]["vocab_size"] == 320 and results["max_model_len"] == 256
    # the plan is recorded; --render-only redraws the same README from results.json
    again = out / "again"
    again.mkdir()
    (again / "results.json").write_text(json.dumps(results))
    assert main(["bench", "report", "--render-only", "--out", str(again)]) == 0
    assert (again / "README.md").read_text() == readme


def test_report_memory_and_budget_numbers_are_consistent(report):
    _, results, readme = report
    runs = results["sections"]["budgets"]["runs"]
    assert {(r["num_kv_blocks"], r["kv_reservation"]) for r in runs} == {
        (b, p) for b in BUDGETS for p in ("none", "request", "max_model_len")}
    for r in runs:
        assert sum(r["slot_shares"].values()) == pytest.approx(1.0)
        assert r["output_tokens"] == r["expected_output_tokens"]  # every run did the whole workload
        # reserving the 256-token window admits budget * 16 / 256 requests at most
        if r["kv_reservation"] == "max_model_len":
            assert r["max_running_requests"] <= r["num_kv_blocks"] * 16 // 256
    for b in BUDGETS:
        p = {r["kv_reservation"]: r for r in runs if r["num_kv_blocks"] == b}
        share = {k: v["slot_shares"]["token_states"] for k, v in p.items()}
        assert share["none"] >= share["request"] > share["max_model_len"]
        assert p["none"]["mean_running_requests"] > p["max_model_len"]["mean_running_requests"]
    top = {r["kv_reservation"]: r for r in runs if r["num_kv_blocks"] == max(BUDGETS)}
    assert f"{100 * top['none']['slot_shares']['token_states']:.1f}%" in readme

    hf, = results["sections"]["budgets"]["hf"]
    chat = workload_items("chat", 8, 0, 0.1, 320)
    assert hf["batch_size"] == largest_static_batch(chat, 64 * 16) >= 1
    assert hf["cache_tokens_needed"] <= 64 * 16 and hf["output_tokens"] == top["none"]["output_tokens"]


def test_report_prefix_sampling_latency_and_recompute_numbers(report):
    _, results, _ = report
    s = results["sections"]
    on, off = s["prefix"]["on"], s["prefix"]["off"]
    assert off["prefix_cache_hits"] == 0 and on["prefix_cache_hits"] > 0
    assert off["prefill_tokens_computed"] == off["prompt_tokens"]  # nothing cached, nothing preempted
    assert on["prefill_tokens_computed"] == on["prompt_tokens"] - on["prefix_cache_hits"]
    assert on["prefill_tokens_computed"] < off["prefill_tokens_computed"]
    assert on["kv_blocks_peak"] <= off["kv_blocks_peak"]

    for row in s["sampling"]:
        sh, ind = row["shared"], row["independent"]
        assert sh["output_tokens"] == ind["output_tokens"]  # the same n x max_tokens either way
        assert sh["num_preemptions"] == ind["num_preemptions"] == 0
        assert 0 < row["saving_mean"] < 1 and row["saving_mean"] == pytest.approx(
            1 - sh["blocks_mean"] / ind["blocks_mean"])
    assert [r["n"] for r in s["sampling"]] == [2, 4]

    lat = s["latency"]
    assert set(lat["policies"]) == {"none", "max_model_len"} and len(lat["rates"]) == 2
    for points in lat["policies"].values():
        assert [p["request_rate"] for p in points] == lat["rates"]
        assert all(p["completed"] == 5 and p["failed"] == 0 and p["mean_normalized_latency_s_per_token"] > 0
                   for p in points)

    assert [r["length"] for r in s["recompute"]] == [16, 64]
    assert all(r["cached_ms"] > 0 and r["recompute_ms"] > 0 for r in s["recompute"])


def test_report_beam_search_numbers_are_consistent(report):
    _, results, readme = report
    sec = results["sections"]["beam"]
    assert sec["batched"] and [r["beam_width"] for r in sec["runs"]] == [2, 4]
    prompts = workload_items("chat", 8, 0, 0.1, 320)[:2]  # the first chat prompts, with their workload lengths
    assert sec["workload"]["num_requests"] == 2
    assert sec["workload"]["output_tokens"] == sum(it.max_tokens for it in prompts)
    for r in sec["runs"]:
        assert r["num_prompts"] == 2 and r["batched"] and r["steps"] > 0
        assert r["num_preemptions"] == 0  # the pool holds every beam unshared
        assert 0 < r["blocks_mean"] <= r["unshared_blocks_mean"] and r["blocks_peak"] <= r["unshared_blocks_peak"]
        assert r["blocks_peak"] >= r["blocks_mean"] and r["unshared_blocks_peak"] >= r["unshared_blocks_mean"]
        assert r["unshared_blocks_peak"] <= sec["num_kv_blocks"]
        assert r["saving_mean"] == pytest.approx(1 - r["blocks_mean"] / r["unshared_blocks_mean"])
        assert r["saving_peak"] == pytest.approx(1 - r["blocks_peak"] / r["unshared_blocks_peak"])
        assert 0 <= r["saving_mean"] < 1 - 1 / r["beam_width"] + 1e-9  # k beams share at most all but one copy
        assert r["beam_tokens"] == r["beam_width"] * sum(it.max_tokens for it in prompts)
        assert r["beam_tokens_per_s"] == pytest.approx(r["beam_tokens"] / r["elapsed_s"])
    section = readme[readme.index("## 7. Beam search"):]
    assert "37.6-55.2%" in section and f"{100 * sec['runs'][-1]['saving_mean']:.1f}%" in section


def test_report_tier_and_swap_numbers_are_consistent(report):
    _, results, readme = report
    tier = results["sections"]["tier"]
    runs = {r["mode"]: r for r in tier["runs"]}
    assert set(runs) == {"none", "tier", "swap"} and len({r["answers_sha256"] for r in tier["runs"]}) == 1
    assert runs["none"]["kv_offload_hits"] == 0 and runs["tier"]["kv_offload_hits"] > 0
    assert runs["tier"]["prefill_tokens_computed"] < runs["none"]["prefill_tokens_computed"]
    for r in runs.values():
        assert r["num_kv_blocks"] == 16 and r["working_set_blocks"] > 16 and r["num_conversations"] == 4
        assert r["prefill_tokens_computed"] <= r["prompt_tokens_submitted"] + r["output_tokens"]
        assert r["prefix_cache_hits"] <= r["prefix_cache_queries"] and r["num_swapped_out"] <= r["num_preemptions"]
    assert f"{runs['none']['prefill_tokens_computed']:,}" in readme
    swap = results["sections"]["swap"]
    assert [r["block_size"] for r in swap["mechanism"]] == [8, 16]
    assert [r["blocks"] for r in swap["mechanism"]] == [8, 4]  # 64 tokens
    assert all(r["swap_out_s"] > 0 and r["swap_in_s"] > 0 and r["recompute_s"] > 0 for r in swap["mechanism"])
    e2e = {(r["block_size"], r["mode"]): r for r in swap["end_to_end"]}
    assert set(e2e) == {(b, m) for b in (8, 16) for m in ("recompute", "swap")}
    assert e2e[(16, "recompute")]["num_preemptions"] > 0  # 3 blocks of 16 for 6 requests
    for (b, mode), r in e2e.items():
        assert r["num_kv_blocks"] == 48 // b and r["num_swapped_out"] <= r["num_preemptions"]
        if mode == "recompute":
            assert r["num_swapped_out"] == 0 and r["kv_blocks_loaded"] == 0
            assert r["prefill_tokens_computed"] >= r["prompt_tokens"]
        elif r["num_swapped_out"] == r["num_preemptions"]:  # every context came back by copies: prompts only
            assert r["prefill_tokens_computed"] == r["prompt_tokens"]
            assert r["kv_blocks_loaded"] >= r["num_swapped_out"]
    assert e2e[(16, "swap")]["num_swapped_out"] > 0


def test_report_keeps_earlier_sections_when_asked(report, tmp_path, tiny_model_dir):
    """--keep-sections: a run of section 9 alone keeps the other sections of the folder's results.json, and the
    README names the run they came from."""
    _, results, _ = report
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert main(["bench", "report", "--model", tiny_model_dir, "--dtype", "float32", "--num-threads", "1",
                 "--out", str(tmp_path), "--workload-scale", "0.1", "--quiet", "--keep-sections", "--sections", "9",
                 "--chat-requests", "4", "--swap-block-sizes", "16", "--swap-requests", "2",
                 "--swap-pool-tokens", "128", "--swap-context-tokens", "32", "--kv-offload-memory", "8MiB"]) == 0
    merged = json.loads((tmp_path / "results.json").read_text())
    assert set(merged["sections"]) == set(results["sections"])
    assert merged["sections"]["tier"] == results["sections"]["tier"]
    assert [r["block_size"] for r in merged["sections"]["swap"]["mechanism"]] == [16]
    assert merged["earlier"]["command"] == results["command"]
    assert f"`{results['command']}` on {results['date']}" in (tmp_path / "README.md").read_text()


def test_beam_memory_runs_searches_one_at_a_time_or_batched(tiny_model_dir):
    from benchmarks.beam_memory import measure
    from pagedserve.engine import LLMEngine
    engine = LLMEngine(model=tiny_model_dir, dtype="float32", block_size=4, enable_prefix_caching=False,
                       num_threads=1)
    prompts, lengths = [list(range(3, 20)), list(range(40, 50))], [6, 9]
    one = measure(engine, prompts, lengths, 3, batched=False)
    both = measure(engine, prompts, lengths, 3, batched=True)
    for r in (one, both):
        assert r["num_preemptions"] == 0 and r["beam_tokens"] == 3 * 15
        assert r["blocks_peak"] <= r["unshared_blocks_peak"] and r["blocks_mean"] <= r["unshared_blocks_mean"]
        assert r["saving_mean"] > 0  # the 17- and 10-token prompts' full blocks are shared by their 3 beams
    assert both["steps"] < one["steps"]  # batched: the searches step together
    assert both["unshared_blocks_peak"] > one["unshared_blocks_peak"]  # and hold their beams at once
    assert not engine.has_unfinished_requests() and engine.stats()["kv_blocks_used"] == 0
    cached = SimpleNamespace(config=engine.config.replace(enable_prefix_caching=True))
    with pytest.raises(ValueError, match="prefix caching off"):  # other sharing would count as the beams'
        measure(cached, prompts, lengths, 2, batched=True)


# ---- pure helpers ----------------------------------------------------------------------------
def _item(i: int, prompt: int, out: int) -> WorkloadItem:
    return WorkloadItem(f"r{i}", list(range(1, prompt + 1)), out)


def test_static_batch_sizing_follows_the_longest_request_of_each_batch():
    items = [_item(0, 10, 5), _item(1, 30, 2), _item(2, 4, 20), _item(3, 6, 6)]
    assert static_batch_cache_tokens(items, 1) == 32
    assert static_batch_cache_tokens(items, 2) == 2 * (30 + 5)  # batches [0, 1] and [2, 3]: 70 and 52
    assert static_batch_cache_tokens(items, 4) == 4 * (30 + 20)
    assert largest_static_batch(items, 69) == 1
    assert largest_static_batch(items, 70) == 2
    assert largest_static_batch(items, 199) == 3  # 3 x 50 and then 1 x 12
    assert largest_static_batch(items, 200) == 4
    assert largest_static_batch(items, 31) == 0


def test_sustainable_rate_interpolates_the_threshold_crossing():
    assert sustainable_rate([1, 2, 4], [0.1, 0.2, 0.6], 0.4) == (pytest.approx(3.0), "crossed")
    assert sustainable_rate([1, 2], [0.1, 0.15], 0.4) == (2, "above")
    assert sustainable_rate([1, 2], [0.5, 0.9], 0.4) == (None, "below")
    assert sustainable_rate([2, 1], [0.6, 0.2], 0.4) == (pytest.approx(1.5), "crossed")  # sorted by rate
    assert rates_from_capacity(0.8123, [0.5, 1, 2]) == [0.41, 0.81, 1.6]


def test_engine_flags_reproduce_the_config_through_the_cli_parser():
    config = EngineConfig(model="/m", dtype="float32", num_kv_blocks=64, max_model_len=256,
                          enable_prefix_caching=False, kv_reservation="max_model_len", num_threads=1)
    args = build_parser().parse_args(["serve", *engine_flags(config)])
    assert engine_config(args) == config


def test_workload_items_scale_and_fold_into_a_small_vocabulary():
    assert generator_kwargs("chat", 1.0) == {}
    assert generator_kwargs("shared", 0.5) == {"system_len": 128, "output_median": 48}
    raw = workload_items("shared", 6, seed=1)
    folded = workload_items("shared", 6, seed=1, vocab_size=320)
    assert [it.max_tokens for it in folded] == [it.max_tokens for it in raw]
    for a, b in zip(raw, folded):
        assert b.prompt_token_ids == [t % 320 for t in a.prompt_token_ids]
    with_prefix = [it for it in folded if it.shared_prefix_len]
    assert len(with_prefix) >= 2
    assert all(it.prompt_token_ids[:256] == with_prefix[0].prompt_token_ids[:256] for it in with_prefix)


def test_presets_and_overrides(tiny_model_dir, tmp_path, capsys):
    parse = build_parser().parse_args
    quick = plan_from_args(parse(["bench", "report", "--quick"]))
    assert quick.chat_requests == QUICK.chat_requests and quick.serve_budget == min(QUICK.budgets)
    full = plan_from_args(parse(["bench", "report", "--budgets", "512,128,256", "--hf-budgets", "512,999"]))
    assert full.chat_requests == FULL.chat_requests and full.budgets == [512, 128, 256]
    assert full.hf_budgets == [512] and full.serve_budget == 128
    pinned = plan_from_args(parse(["bench", "report", "--budgets", "256,512", "--serve-budget", "512"]))
    assert pinned.serve_budget == 512
    assert parse(["bench", "report"]).max_model_len == 2048
    # a budget below one window is refused before anything runs
    rc = main(["bench", "report", "--budgets", "8,64", "--out", str(tmp_path), "--sections", "1",
               "--model", tiny_model_dir, "--max-model-len", "256"])
    assert rc == 2 and "[8] hold less than one 256-token window" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


# ---- where the report lives ----------------------------------------------------------------
def test_the_installed_package_holds_no_report_or_timing_scripts():
    from setuptools import find_packages
    assert not list(REPO.glob("pagedserve/**/report*.py"))
    assert not list(REPO.glob("pagedserve/**/*_timing.py"))
    # pyproject's packages.find include: the wheel holds pagedserve* only
    assert not any(p.startswith("benchmarks") for p in find_packages(str(REPO), include=["pagedserve*"]))
    for name in ("report", "report_runs", "report_server", "report_render", "forward_timing", "decode_timing",
                 "beam_memory"):
        assert (REPO / "benchmarks" / f"{name}.py").is_file()


def test_report_without_the_checkout_says_where_it_lives(capsys):
    from pagedserve.bench import cli as bench_cli
    with mock.patch.object(bench_cli, "_benchmarks_report", return_value=None):
        assert main(["bench", "report", "--out", "x", "--quick"]) == 2
        assert main(["bench", "report", "--help"]) == 2
    err = capsys.readouterr().err
    assert "benchmarks/ of a source checkout" in err and "python -m benchmarks.report" in err


def test_report_runs_as_a_module_from_the_checkout():
    r = subprocess.run([sys.executable, "-m", "benchmarks.report", "--help"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: pagedserve bench report") and "(default: docs/report)" in r.stdout
