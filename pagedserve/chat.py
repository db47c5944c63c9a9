"""`pagedserve chat`: an interactive terminal chat that streams tokens and keeps the conversation.

Each turn re-sends the whole conversation; its earlier turns are found in the prefix cache,
so only the new message is computed (the line after each answer shows how many tokens hit).
On a terminal the prompt is read through readline (arrow keys edit the line, up/down recall
earlier messages); Ctrl-C at the prompt quits, Ctrl-C while the model writes stops the answer.
Sampling follows the model's own generation config unless a flag says otherwise.
"""
from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, TextIO

from pagedserve.config import EngineConfig
from pagedserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagedserve.engine import LLMEngine, StepError

HELP = "Type a message and press Enter. /reset starts a new conversation, /exit (or Ctrl-D, Ctrl-C) quits."
# What the chat samples with when the model ships no sampling settings: a common chat setting,
# varied but on topic (greedy decoding of a small model loops).
FALLBACK_SAMPLING = {"temperature": 0.7, "top_p": 0.9}


class LineReader:
    """The user's lines. On a terminal: input(), which has line editing and history once readline
    is imported; otherwise (pipes, tests) plain readline() on `inp`, prompt written to `out`."""

    def __init__(self, inp: TextIO, out: TextIO) -> None:
        self.inp, self.out = inp, out
        # input() reads sys.stdin and prompts on sys.stdout: only then is it the same as inp/out.
        self.terminal = inp is sys.stdin and out is sys.stdout and _isatty(inp)
        if self.terminal:
            _enable_line_editing()

    def read(self, prompt: str = "> ") -> str | None:
        """The next line, without its newline; None at end of input or on Ctrl-C (both end the chat)."""
        try:
            if self.terminal:
                return input(prompt)
            self.out.write(prompt)
            self.out.flush()
            line = self.inp.readline()
        except (EOFError, KeyboardInterrupt):
            return None
        return line.rstrip("\r\n") if line else None


def _isatty(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _enable_line_editing() -> None:
    """Importing readline is what gives input() arrow-key editing and history; without it the
    terminal passes escape bytes (ESC [ D for the left arrow) into the line."""
    try:
        import readline  # noqa: F401
    except ImportError:  # a Python built without it (Windows): plain input() still works
        pass


def chat_sampling(user: dict, model_defaults: dict) -> tuple[SamplingParams, str]:
    """SamplingParams from the user's flags over the model's sampling settings (or, when the model
    ships none, FALLBACK_SAMPLING); plus where the defaults came from, for the banner."""
    if model_defaults:
        base, source = model_defaults, "the model's generation config"
    else:
        base, source = FALLBACK_SAMPLING, "pagedserve's chat defaults"
    return SamplingParams(**{**base, **user}), source


def describe_sampling(p: SamplingParams) -> str:
    if p.temperature == 0:
        return "greedy"
    parts = [f"temperature {p.temperature:g}", f"top_p {p.top_p:g}"] + ([f"top_k {p.top_k}"] if p.top_k else [])
    return ", ".join(parts)


def stream_reply(engine: LLMEngine, prompt_ids: list[int], params: SamplingParams, out=sys.stdout):
    """Generate one answer, writing text as it comes; returns (text, the request's last output, output token count)."""
    rid = engine.add_request(None, {"prompt_token_ids": prompt_ids}, params)
    text, last, num_tokens = [], None, 0
    try:
        while engine.has_unfinished_requests():
            for delta in engine.step():
                if delta.request_id != rid:
                    continue
                piece = "".join(o.text for o in delta.outputs)
                num_tokens += sum(len(o.token_ids) for o in delta.outputs)
                text.append(piece)
                out.write(piece)
                out.flush()
                last = delta
    except KeyboardInterrupt:
        engine.abort_request(rid)
        out.write(" [interrupted]")
    out.write("\n")
    return "".join(text), last, num_tokens


def stop_note(last, num_tokens: int, params: SamplingParams, max_model_len: int) -> str | None:
    """Why an answer ended early, when the user should know: a limit cut it, not the model."""
    reason = last.outputs[0].finish_reason if last is not None and last.outputs else None
    if reason != "length":
        return None
    if params.max_tokens is not None and num_tokens >= params.max_tokens:
        return f"[stopped: reached max_tokens={params.max_tokens}; raise it with --max-tokens]"
    return f"[stopped: the conversation filled the {max_model_len}-token context window; /reset starts a new one]"


def interactive_chat(config: EngineConfig, sampling: dict | None = None, system: str | None = None,
                     inp: TextIO = sys.stdin, out: TextIO = sys.stdout) -> int:
    """Run the chat until /exit, end of input or Ctrl-C at the prompt.

    sampling: the SamplingParams fields the user chose (flags given); the rest come from the model.
    """
    from pagedserve.engine import LLMEngine, StepError
    from pagedserve.tokenizer import apply_chat_template

    engine = LLMEngine(config)
    params, source = chat_sampling(sampling or {}, engine.loaded.generation_defaults)
    reader = LineReader(inp, out)
    out.write(f"pagedserve chat with {engine.model_name}, sampling {describe_sampling(params)} "
              f"(defaults: {source}). {HELP}\n")
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    while True:
        line = reader.read()
        if line is None or line.strip() in ("/exit", "/quit"):
            out.write("\n")
            return 0
        line = line.strip()
        if not line:
            continue
        if line == "/reset":
            messages = messages[:1] if system else []
            out.write("(new conversation)\n")
            continue
        messages.append({"role": "user", "content": line})
        prompt_ids = apply_chat_template(engine.tokenizer, messages)
        start = time.perf_counter()
        try:
            text, last, num_tokens = stream_reply(engine, prompt_ids, params, out)
        except ValueError as e:  # refused before it started: the conversation outgrew the window or pool
            messages.pop()
            out.write(f"[not sent: {e}; /reset starts a new conversation]\n")
            continue
        except StepError as e:  # the engine aborted this answer (a failed step) and goes on
            messages.pop()
            out.write(f"\n[failed: {e}; the conversation goes on without it]\n")
            continue
        messages.append({"role": "assistant", "content": text})
        note = stop_note(last, num_tokens, params, engine.max_model_len)
        if note:
            out.write(note + "\n")
        cached = last.num_cached_tokens if last else 0
        out.write(f"[{len(prompt_ids)} prompt tokens, {cached} from the prefix cache, "
                  f"{time.perf_counter() - start:.1f} s]\n")
