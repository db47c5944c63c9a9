"""The command line: help (with every default), option errors, generate, `make run`'s address.
The interactive chat has its own file, test_chat.py."""
import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pagedserve.cli import build_parser, engine_config, main
from pagedserve.config import EngineConfig

REPO = Path(__file__).resolve().parents[1]


def test_engine_flags_mirror_the_config():
    args = build_parser().parse_args(["generate", "hi", "--kv-cache-memory", "512MiB", "--num-kv-blocks", "7",
                                      "--no-enable-prefix-caching", "--kv-reservation", "max_model_len"])
    cfg = engine_config(args)
    assert (cfg.kv_cache_memory, cfg.num_kv_blocks, cfg.enable_prefix_caching, cfg.kv_reservation) == \
        ("512MiB", 7, False, "max_model_len")


def test_help_explains_each_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--kv-cache-memory", "--block-size", "--max-num-seqs", "--kv-reservation", "--dtype"):
        assert re.search(flag + r"\b.*\n?.*\w", text)


def _help(argv: list[str], capsys, monkeypatch) -> list[str]:
    """The lines of `pagedserve ARGV --help`, printed wide enough that no option's help wraps."""
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out.splitlines()


def _help_of(lines: list[str], flag: str) -> str:
    """An option's entry: its line, plus the next when a long flag pushed the help text there."""
    i = next(i for i, line in enumerate(lines) if line.lstrip().startswith(flag + " ") or line.lstrip() == flag)
    follows = lines[i + 1] if i + 1 < len(lines) else ""
    joined = lines[i] + (" " + follows.strip() if follows.startswith(" " * 8) else "")
    return joined.strip()


@pytest.mark.parametrize("argv,shown", [
    (["serve"], {"--host HOST": "127.0.0.1", "--port PORT": "8000", "--block-size BLOCK_SIZE": "16",
                 "--kv-cache-memory KV_CACHE_MEMORY": "1GiB on the CPU; on a GPU, what --gpu-memory-utilization leaves",
                 "--gpu-memory-utilization GPU_MEMORY_UTILIZATION": "0.9", "--max-num-seqs MAX_NUM_SEQS": "256",
                 "--kv-reservation {none,request,max_model_len}": "none", "--seed SEED": "0",
                 "--enable-prefix-caching, --no-enable-prefix-caching": "True",
                 "--max-model-len MAX_MODEL_LEN": "the model's"}),
    (["generate"], {"--max-tokens MAX_TOKENS": "128", "--temperature TEMPERATURE": "0.0", "--top-p TOP_P": "1.0",
                    "--chat-template, --no-chat-template": "True"}),
    (["chat"], {"--max-tokens MAX_TOKENS": "512", "--dtype {auto,float32,bfloat16,float16}": "auto"}),
    (["bench", "workload"], {"--n N": "128", "--seed SEED": "0"}),
    (["bench", "throughput"], {"--hf-batch-sizes HF_BATCH_SIZES": "[1, 8, 32]",
                               "--profile-out PROFILE_OUT": "profile.txt", "--quiet": "False"}),
    (["bench", "serve"], {"--endpoint ENDPOINT": "/v1/completions", "--percentiles PERCENTILES": "[50, 90, 99]"}),
    (["bench", "report"], {"--out OUT": "docs/report", "--workload-seed WORKLOAD_SEED": "0",
                           "--max-model-len MAX_MODEL_LEN": "2048"}),
])
def test_help_shows_the_defaults(argv, shown, capsys, monkeypatch):
    lines = _help(argv, capsys, monkeypatch)
    for flag, default in shown.items():
        assert _help_of(lines, flag).endswith(f"(default: {default})"), flag


def test_every_option_of_every_command_states_its_default():
    def parsers(parser):
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from parsers(sub)

    for parser in parsers(build_parser()):
        assert issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter), parser.prog
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.option_strings and action.default is not argparse.SUPPRESS:
                assert "default" in formatter._get_help_string(action), f"{parser.prog} {action.option_strings}"
    # chat's sampling defaults come from the model: the help says so instead of "None"
    chat = build_parser().parse_args(["chat"])
    assert chat.temperature is None and chat.top_p is None


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_run_takes_host_and_port_from_its_command_line():
    def serve_line(*make_args, **env) -> str:
        out = subprocess.run(["make", "-n", "run", *make_args], cwd=REPO, capture_output=True, text=True, check=True,
                             env={**os.environ, **env}).stdout
        return next(line for line in out.splitlines() if "pagedserve serve" in line)

    assert serve_line().endswith("pagedserve serve --host 127.0.0.1 --port 8000")
    assert serve_line("HOST=0.0.0.0", "PORT=9123").endswith("pagedserve serve --host 0.0.0.0 --port 9123")
    assert serve_line(HOST="build-box-7").endswith("--host 127.0.0.1 --port 8000")  # not the environment's HOST


def test_unknown_option_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "hi", "--no-such-option", "3"])
    assert e.value.code == 2
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err
    with pytest.raises(TypeError, match="unknown engine option"):
        EngineConfig.from_kwargs(block_sise=16)


def test_generate_prints_completions(tiny_model_dir):
    r = subprocess.run([sys.executable, "-m", "pagedserve.cli", "generate", "Hello world", "--model", tiny_model_dir,
                        "--dtype", "float32", "--max-tokens", "5", "--num-kv-blocks", "32"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("--- 'Hello world'\n")


def test_bad_model_path_is_a_clear_error(capsys):
    assert main(["generate", "hi", "--model", "/no/such/model"]) == 2
    assert "pagedserve: error:" in capsys.readouterr().err


def _env_after_import(**env) -> str:
    """GOMP_SPINCOUNT as `import pagedserve` leaves it in a fresh interpreter started with `env`."""
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    code = "import os, pagedserve; print(os.environ.get('GOMP_SPINCOUNT'))"
    return subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_import_bounds_the_openmp_spin_unless_the_user_chose():
    assert _env_after_import() == "1000"
    assert _env_after_import(GOMP_SPINCOUNT="5") == "5"
    assert _env_after_import(OMP_WAIT_POLICY="PASSIVE") == "None"  # libgomp would let the count override it


def test_export_tokenizer_writes_a_folder_transformers_loads(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoTokenizer
    out = tmp_path / "tok"
    assert main(["export-tokenizer", str(out), "--model", tiny_model_dir]) == 0
    assert "tokenizer.json" in capsys.readouterr().out
    mine, theirs = AutoTokenizer.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(str(out))
    text = "Hello world! Paged attention stores keys and values."
    assert theirs.encode(text) == mine.encode(text)
    chat = [{"role": "user", "content": "hi"}]
    assert theirs.apply_chat_template(chat, tokenize=False) == mine.apply_chat_template(chat, tokenize=False)
