"""`pagedserve chat`: the conversation loop (prefix reuse, Ctrl-C, the token-limit note), its sampling
defaults (the model's generation config, else the chat's own), and line editing on a real terminal."""
from __future__ import annotations

import io
import json
import os
import re
import select
import shutil
import sys
import time
from types import SimpleNamespace

import pytest

from pagedserve.chat import FALLBACK_SAMPLING, chat_sampling, interactive_chat, stop_note
from pagedserve.cli import build_parser, sampling_overrides
from pagedserve.config import EngineConfig
from pagedserve.model import generation_defaults, load_model
from pagedserve.sampling_params import SamplingParams


def _config(model_dir: str) -> EngineConfig:
    return EngineConfig(model=model_dir, dtype="float32", num_kv_blocks=64, block_size=4)


def _chat(model_dir: str, typed: str, sampling: dict, inp=None, out=None) -> str:
    out = out or io.StringIO()
    assert interactive_chat(_config(model_dir), sampling, inp=inp or io.StringIO(typed), out=out) == 0
    return out.getvalue()


class LinesThenCtrlC(io.StringIO):
    """Stdin that delivers its lines, then Ctrl-C at the next prompt (readline raises KeyboardInterrupt)."""

    def readline(self, *args):
        line = super().readline(*args)
        if not line:
            raise KeyboardInterrupt
        return line


class CtrlCDuringFirstAnswer(io.StringIO):
    """Stdout on which Ctrl-C arrives while the first answer streams (its first write raises)."""

    def __init__(self) -> None:
        super().__init__()
        self.prompts, self.fired = 0, False

    def write(self, s: str) -> int:
        if s == "> ":
            self.prompts += 1
        elif self.prompts == 1 and not self.fired:
            self.fired = True
            raise KeyboardInterrupt
        return super().write(s)


@pytest.fixture(scope="module")
def model_with_sampling(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny model with sampling settings in its generation_config.json."""
    folder = tmp_path_factory.mktemp("tiny_with_sampling") / "m"
    shutil.copytree(tiny_model_dir, folder)
    gen_file = folder / "generation_config.json"
    gen = json.loads(gen_file.read_text())
    gen.update(temperature=0.3, top_p=0.8, top_k=20, do_sample=True)
    gen_file.write_text(json.dumps(gen))
    return str(folder)


# ---- the conversation loop -------------------------------------------------------------------
def test_chat_streams_and_reuses_the_conversation_prefix(tiny_model_dir):
    text = _chat(tiny_model_dir, "Hello there, how are you today?\nAnd what about tomorrow?\n/exit\n",
                 {"max_tokens": 6, "temperature": 0})
    stats = re.findall(r"\[(\d+) prompt tokens, (\d+) from the prefix cache", text)
    assert len(stats) == 2
    (p1, c1), (p2, c2) = [(int(a), int(b)) for a, b in stats]
    assert c1 == 0 and p2 > p1 and c2 >= p1 - 4  # the whole first turn (but a partial block) is reused


def test_ctrl_c_at_the_prompt_quits_cleanly(tiny_model_dir):
    text = _chat(tiny_model_dir, "", {"max_tokens": 2, "temperature": 0}, inp=LinesThenCtrlC("Hello\n"))
    assert len(re.findall(r"prompt tokens", text)) == 1 and text.endswith("> \n")
    assert _chat(tiny_model_dir, "", {}, inp=LinesThenCtrlC("")).endswith("> \n")  # at the very first prompt


def test_ctrl_c_while_answering_stops_only_that_answer(tiny_model_dir):
    out = CtrlCDuringFirstAnswer()
    text = _chat(tiny_model_dir, "Hello\nAgain\n/exit\n", {"max_tokens": 4, "temperature": 0}, out=out)
    _, second = text.split("[interrupted]")
    assert "prompt tokens" in second  # the next message is answered as usual


def test_an_answer_cut_by_max_tokens_says_so(tiny_model_dir):
    text = _chat(tiny_model_dir, "Hello\n/exit\n", {"max_tokens": 3, "temperature": 0, "ignore_eos": True})
    assert "\n[stopped: reached max_tokens=3; raise it with --max-tokens]\n" in text
    # an answer the model ended itself carries no note
    every_token_stops = {"max_tokens": 3, "temperature": 0, "stop_token_ids": list(range(320))}
    assert "[stopped" not in _chat(tiny_model_dir, "Hello\n/exit\n", every_token_stops)


def test_stop_note_tells_the_token_limit_from_the_context_window():
    params = SamplingParams(max_tokens=10)
    length = SimpleNamespace(outputs=[SimpleNamespace(finish_reason="length")])
    stop = SimpleNamespace(outputs=[SimpleNamespace(finish_reason="stop")])
    assert stop_note(length, 10, params, 256) == "[stopped: reached max_tokens=10; raise it with --max-tokens]"
    assert "filled the 256-token context window" in stop_note(length, 4, params, 256)
    assert stop_note(stop, 4, params, 256) is None and stop_note(None, 0, params, 256) is None


def test_a_conversation_that_no_longer_fits_is_refused_not_fatal(tiny_model_dir):
    cfg = EngineConfig(model=tiny_model_dir, dtype="float32", num_kv_blocks=64, block_size=4, max_model_len=24)
    out = io.StringIO()
    typed = "Hello\n" + "a very long message " * 8 + "\n/exit\n"
    assert interactive_chat(cfg, {"max_tokens": 2, "temperature": 0}, inp=io.StringIO(typed), out=out) == 0
    assert "[not sent:" in out.getvalue()


# ---- sampling defaults -----------------------------------------------------------------------
def test_sampling_follows_the_model_then_the_chat_defaults_and_flags_override():
    p, source = chat_sampling({}, {})
    assert (p.temperature, p.top_p, p.top_k) == (FALLBACK_SAMPLING["temperature"], FALLBACK_SAMPLING["top_p"], 0)
    assert source == "pagedserve's chat defaults"
    p, source = chat_sampling({"top_p": 0.5, "max_tokens": 7}, {"temperature": 0.3})
    assert (p.temperature, p.top_p, p.max_tokens) == (0.3, 0.5, 7)  # the model's settings, not the fallback
    assert source == "the model's generation config"
    assert chat_sampling({"temperature": 0.0}, {"temperature": 0.3, "top_k": 20})[0].temperature == 0.0


def test_chat_flags_leave_unset_sampling_to_the_model():
    parse = build_parser().parse_args
    assert sampling_overrides(parse(["chat"])) == {"max_tokens": 512}
    assert sampling_overrides(parse(["chat", "--temperature", "0", "--top-k", "5"])) == \
        {"max_tokens": 512, "temperature": 0.0, "top_k": 5}
    # generate keeps its greedy defaults
    assert sampling_overrides(parse(["generate", "hi"])) == {"max_tokens": 128, "temperature": 0.0, "top_p": 1.0,
                                                             "top_k": 0}


def test_models_carry_their_generation_config(tiny_model_dir, model_with_sampling):
    assert load_model(model_with_sampling, dtype="float32").generation_defaults == \
        {"temperature": 0.3, "top_p": 0.8, "top_k": 20}
    assert load_model(tiny_model_dir, dtype="float32").generation_defaults == {}  # only ids in its file
    meta = {"general.sampling.temp": 0.6, "general.sampling.top_k": 40, "general.name": "x"}
    assert generation_defaults.from_gguf_metadata(meta) == {"temperature": 0.6, "top_k": 40}
    with pytest.raises(ValueError, match="general.sampling.top_p"):
        generation_defaults.from_gguf_metadata({"general.sampling.top_p": "high"})


def test_the_chat_banner_shows_the_sampling_in_use(tiny_model_dir, model_with_sampling):
    assert "sampling temperature 0.3, top_p 0.8, top_k 20 (defaults: the model's generation config)" in \
        _chat(model_with_sampling, "/exit\n", {})
    assert "sampling greedy" in _chat(model_with_sampling, "/exit\n", {"temperature": 0})
    assert "sampling temperature 0.7, top_p 0.9 (defaults: pagedserve's chat defaults)" in \
        _chat(tiny_model_dir, "/exit\n", {})


# ---- a real terminal -------------------------------------------------------------------------
def _run_on_a_terminal(argv: list[str], prompt: bytes, keys: list[bytes], timeout: float = 120) -> tuple[str, int]:
    """Run argv on a pseudo-terminal, typing keys[i] once the prompt has appeared i + 1 times; returns
    (everything the terminal showed, exit code)."""
    import pty
    pid, fd = pty.fork()
    if pid == 0:  # the child: its stdin, stdout and controlling terminal are the pty
        os.execve(argv[0], argv, {**os.environ, "TERM": "xterm"})
    shown, typed = b"", 0
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if typed < len(keys) and shown.count(prompt) > typed:
                # Type like a person, a moment after the prompt shows: CPython's readline loses a Ctrl-C
                # that lands between drawing the prompt and waiting for input.
                time.sleep(0.5)
                os.write(fd, keys[typed])
                typed += 1
            if not select.select([fd], [], [], 0.1)[0]:
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child exited and the terminal closed
                break
            if not chunk:
                break
            shown += chunk
        else:
            os.kill(pid, 9)
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return shown.decode(errors="replace"), os.waitstatus_to_exitcode(status)


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")
def test_arrow_keys_edit_the_line_and_ctrl_c_ends_input_on_a_terminal():
    code = ("import sys\nfrom pagedserve.chat import LineReader\nr = LineReader(sys.stdin, sys.stdout)\n"
            "print('terminal', r.terminal, flush=True)\n"
            "for _ in range(3):\n    print('GOT', repr(r.read('PROMPT> ')), flush=True)\n")
    left, up = b"\x1b[D", b"\x1b[A"
    shown, rc = _run_on_a_terminal([sys.executable, "-c", code], b"PROMPT> ",
                                   [b"hel" + left + b"x\r", up + b"!\r", b"\x03"])
    assert rc == 0, shown
    assert "terminal True" in shown
    assert "GOT 'hexl'" in shown        # the left arrow moved the cursor; no escape bytes in the line
    assert "GOT 'hexl!'" in shown       # the up arrow recalled the previous line
    assert "GOT None" in shown and "Traceback" not in shown  # Ctrl-C at the prompt: end of input


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")
def test_pagedserve_chat_on_a_terminal_exits_cleanly_on_ctrl_c(tiny_model_dir):
    argv = [sys.executable, "-m", "pagedserve.cli", "chat", "--model", tiny_model_dir, "--dtype", "float32",
            "--num-kv-blocks", "32", "--max-tokens", "3", "--temperature", "0"]
    shown, rc = _run_on_a_terminal(argv, b"\n> ", [b"Hello\r", b"\x03"])
    assert rc == 0, shown
    assert "prompt tokens" in shown and "Traceback" not in shown and "KeyboardInterrupt" not in shown


def test_a_failed_step_ends_that_answer_not_the_chat(tiny_model_dir, monkeypatch):
    from pagedserve.engine import LLMEngine
    real, calls = LLMEngine._run_step, {"n": 0}

    def flaky(self, sched):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected fault")
        return real(self, sched)

    monkeypatch.setattr(LLMEngine, "_run_step", flaky)
    text = _chat(tiny_model_dir, "Hello\nAgain\n/exit\n", {"max_tokens": 4, "temperature": 0})
    failed, second = text.split("[failed: RuntimeError: injected fault; the conversation goes on without it]")
    assert "prompt tokens" in second  # the next message is answered as usual
