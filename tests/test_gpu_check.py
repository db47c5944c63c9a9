"""benchmarks/gpu_check.py, the one prepared GPU check of issue 15: its smoke mode runs every section on this
CPU (Triton's interpreter, toy sizes) in a child process without the server's packages, as the GPU machine
has none of them. Also: the engine itself runs without those packages, and a feature that needs one names it."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks import gpu_check

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# pagedserve's dependencies the GPU machine lacks (it has torch, triton, transformers, numpy, safetensors,
# tokenizers, jinja2, tqdm, httpx, pytest, hypothesis). Blocked by a None in sys.modules: an import of them fails.
MISSING_ON_GPU = ("fastapi", "uvicorn", "gguf", "prometheus_client", "xgrammar", "jwt", "cryptography",
                  "starlette", "pydantic")


def run_without(missing: tuple[str, ...], code: str, timeout: float) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter at the repository root, the `missing` modules unimportable."""
    prelude = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in missing)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-c", prelude + code], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path_factory.mktemp("gpu_check") / "summary.json"
    # As on the GPU: the script file run as __main__, the repository found by the script itself.
    code = (f"sys.argv = ['benchmarks/gpu_check.py', '--smoke', '--out', {str(out)!r}]\n"
            "import runpy\nrunpy.run_path('benchmarks/gpu_check.py', run_name='__main__')\n")
    proc = run_without(MISSING_ON_GPU, code, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_smoke_ends_with_the_json_summary_it_wrote(smoke):
    proc, summary = smoke
    last = proc.stdout.strip().splitlines()[-1]
    assert json.loads(last) == summary
    assert summary["header"]["torch"] and summary["header"]["triton"] and summary["header"]["transformers"]
    assert summary["header"]["date_utc"] and summary["header"]["mode"].startswith("smoke")
    for name in ("parity", "bandwidth", "model", "e2e_parity", "throughput"):
        assert summary["sections"][name]["status"] == "ok", (name, summary["sections"][name])
    assert set(summary["goals"]) >= {"kernel_parity", "decode_bandwidth_70pct", "greedy_parity_fp32", "throughput_3x"}


def test_smoke_kernel_parity_covers_the_matrix(smoke):
    cases = smoke[1]["sections"]["parity"]["cases"]
    assert len(cases) == len(gpu_check.gpu_plan().parity_cases) == 9
    assert {c["dtype"] for c in cases} == {"bfloat16", "float16"}
    assert {c["block_size"] for c in cases} == {16, 32}
    assert {c["heads"][0] // c["heads"][1] for c in cases} == {4, 1}  # GQA and MHA
    assert any(c["splits"] > 1 for c in cases)  # the forced flash-decoding split ran
    assert any(c["num_decodes"] == 0 for c in cases) and any(chunk[0] > 0 for c in cases for chunk in c["prefill_chunks"])
    for c in cases:
        assert c["pass"] and c["caches_equal"] and c["finite"], c
        assert 0 < c["vs_torch"]["rel"] <= c["tolerance"]
    assert smoke[1]["goals"]["kernel_parity"] == "PASS"


def test_smoke_bandwidth_measures_both_backends_against_the_copy(smoke):
    bw = smoke[1]["sections"]["bandwidth"]
    assert bw["copy"]["gb_per_s"] > 0 and bw["goal"] == 0.7
    for c in bw["cases"]:
        assert c["triton_eager_gb_per_s"] > 0 and c["torch_eager_gb_per_s"] > 0
        assert c["fraction_of_copy"] == pytest.approx(c["triton_eager_gb_per_s"] / bw["copy"]["gb_per_s"])
        assert c["kv_bytes"] == 2 * c["num_seqs"] * c["context"] * c["heads"][1] * c["head_dim"] * 2
    assert "PASS" in smoke[0].stdout or "FAIL" in smoke[0].stdout  # a verdict is printed, whatever it is


def test_smoke_end_to_end_parity_and_every_engine(smoke):
    sections = smoke[1]["sections"]
    parity = sections["e2e_parity"]
    assert parity["all_match"] and len(parity["prompts"]) == 3
    assert all(p["matching_prefix"] == p["tokens"] == 8 for p in parity["prompts"])
    tp = sections["throughput"]
    runs = tp["runs"]
    assert set(runs) == set(gpu_check.ENGINES)
    for name in ("pagedserve_graphs", "pagedserve_eager", "hf_continuous"):
        r = runs[name]
        assert "error" not in r, r
        assert r["output_tokens"] == r["expected_output_tokens"] == tp["workload"]["output_tokens"] and not r["partial"]
    assert runs["pagedserve_eager"]["enforce_eager"] and not runs["pagedserve_graphs"]["enforce_eager"]
    assert runs["hf_continuous"]["failed_requests"] == runs["hf_continuous"]["requests_with_other_lengths"] == 0
    static = runs["hf_static"]
    assert static["finished_requests"] == static["requests"] == 4 and static["output_tokens"] > 0
    verdict = tp["verdict"]
    assert verdict["pagedserve_graphs_over_best_transformers"] == pytest.approx(
        runs["pagedserve_graphs"]["output_tokens_per_s"] / verdict["best_transformers_tok_s"])


def test_the_engine_runs_without_the_servers_packages(tmp_path, tiny_model_dir):
    from conftest import build_tiny_hf_model, write_tiny_gguf
    gguf_path = str(tmp_path / "tiny.gguf")
    ref = build_tiny_hf_model(str(tmp_path / "hf"), "llama", seed=3)
    write_tiny_gguf(gguf_path, ref, str(tmp_path / "hf"))  # written here, where the gguf package is
    code = f"""
import json
import pagedserve
from pagedserve import LLM, SamplingParams, StructuredOutputsParams
from pagedserve.optional import MissingDependency
greedy = SamplingParams(max_tokens=6, temperature=0.0)
hf = LLM(model={tiny_model_dir!r}, dtype="float32")
gguf = LLM(model={gguf_path!r})  # transformers' own GGUF reader: no gguf package needed
result = {{"hf": hf.generate(["Hello world"], greedy, use_tqdm=False)[0].outputs[0].token_ids,
          "gguf": gguf.generate(["Hello world"], greedy, use_tqdm=False)[0].outputs[0].token_ids}}
try:
    hf.generate(["x"], SamplingParams(max_tokens=2, structured_outputs=StructuredOutputsParams(regex="a+")),
                use_tqdm=False)
except MissingDependency as e:
    result["structured"] = str(e)
import pagedserve.server.args, pagedserve.bench.cli  # what the command line's parser is built from
result["loaded"] = sorted(m for m in {MISSING_ON_GPU!r} if sys.modules.get(m) is not None)
print(json.dumps(result))
"""
    proc = run_without(MISSING_ON_GPU, code, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(result["hf"]) == 6 and len(result["gguf"]) == 6
    assert "structured output" in result["structured"] and "pip install xgrammar" in result["structured"]
    assert result["loaded"] == []


def test_reading_gguf_without_either_reader_names_the_package(monkeypatch, tmp_path):
    from pagedserve.model import gguf_file
    from pagedserve.optional import MissingDependency
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(MissingDependency, match=r"\.gguf file .*'gguf' package.*pip install gguf"):
        gguf_file.GGUFPackageFile(str(tmp_path / "x.gguf"))


def test_tokenizer_fills_the_models_vocabulary_with_decodable_words(tmp_path):
    tok = gpu_check.build_tokenizer(str(tmp_path), 300)
    assert len(tok) == 300 and (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    text = tok.decode(list(range(259, 300)))
    assert text.isascii() and text.split()[:3] == ["a", "b", "c"]
    assert gpu_check._letters(25) == "z" and gpu_check._letters(26) == "aa"


def test_workload_ids_fit_the_vocabulary():
    ids = [1000, 1001, 39999]
    assert gpu_check.fit_to_vocab(ids, 128256) == ids
    folded = gpu_check.fit_to_vocab(ids, 512)
    assert all(259 <= t < 512 for t in folded) and len(set(folded)) == 3


def test_sections_and_engines_are_picked_by_name():
    assert gpu_check.chosen("e2e,parity", gpu_check.SECTIONS, {"e2e": ("e2e_parity", "throughput")}) == (
        "parity", "e2e_parity", "throughput")
    with pytest.raises(SystemExit, match="unknown name 'nope'"):
        gpu_check.chosen("nope", gpu_check.SECTIONS, {})


def test_call_supported_drops_what_an_older_api_lacks():
    def older(a, b=1):
        return a + b
    assert gpu_check.call_supported(older, 1, b=2, hard_stop=True) == (3, ["hard_stop"])


def test_greedy_comparison_reports_the_margin_at_the_first_mismatch():
    import torch
    logits = [torch.tensor([0.0, 3.0, 2.5, 1.0])] * 3
    r = gpu_check.compare_greedy([1, 1, 1], [1, 2, 1], logits)
    assert r["matching_prefix"] == r["first_mismatch"] == 1 and not r["all_match"]
    assert r["hf_top2_margin"] == pytest.approx(0.5) and r["hf_logit_gap_to_ours"] == pytest.approx(0.5)
    assert gpu_check.compare_greedy([1, 2], [1, 2], logits)["all_match"]
