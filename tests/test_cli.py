"""The command line: help, option errors, generate, and the interactive chat's prefix reuse."""
import io
import os
import re
import subprocess
import sys

import pytest

from pagedserve.chat import interactive_chat
from pagedserve.cli import build_parser, engine_config, main
from pagedserve.config import EngineConfig
from pagedserve.sampling_params import SamplingParams


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


def test_chat_streams_and_reuses_the_conversation_prefix(tiny_model_dir):
    cfg = EngineConfig(model=tiny_model_dir, dtype="float32", num_kv_blocks=64, block_size=4)
    inp = io.StringIO("Hello there, how are you today?\nAnd what about tomorrow?\n/exit\n")
    out = io.StringIO()
    assert interactive_chat(cfg, SamplingParams(max_tokens=6, temperature=0), inp=inp, out=out) == 0
    stats = re.findall(r"\[(\d+) prompt tokens, (\d+) from the prefix cache", out.getvalue())
    assert len(stats) == 2
    (p1, c1), (p2, c2) = [(int(a), int(b)) for a, b in stats]
    assert c1 == 0 and p2 > p1 and c2 >= p1 - 4  # the whole first turn (but a partial block) is reused


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
