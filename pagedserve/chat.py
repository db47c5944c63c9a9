"""`pagedserve chat`: an interactive terminal chat that streams tokens and keeps the conversation.

Each turn re-sends the whole conversation; its earlier turns are found in the prefix cache,
so only the new message is computed (the line after each answer shows how many tokens hit).
"""
from __future__ import annotations

import sys
import time

from pagedserve.config import EngineConfig
from pagedserve.engine import LLMEngine
from pagedserve.sampling_params import SamplingParams
from pagedserve.tokenizer import apply_chat_template

HELP = "Type a message and press Enter. /reset starts a new conversation, /exit (or Ctrl-D) quits."


def stream_reply(engine: LLMEngine, prompt_ids: list[int], params: SamplingParams, out=sys.stdout):
    """Generate one answer, writing text as it comes; returns (text, the request's last output)."""
    rid = engine.add_request(None, {"prompt_token_ids": prompt_ids}, params)
    text, last = [], None
    try:
        while engine.has_unfinished_requests():
            for delta in engine.step():
                if delta.request_id != rid:
                    continue
                piece = "".join(o.text for o in delta.outputs)
                text.append(piece)
                out.write(piece)
                out.flush()
                last = delta
    except KeyboardInterrupt:
        engine.abort_request(rid)
        out.write(" [interrupted]")
    out.write("\n")
    return "".join(text), last


def interactive_chat(config: EngineConfig, params: SamplingParams, system: str | None = None,
                     inp=sys.stdin, out=sys.stdout) -> int:
    engine = LLMEngine(config)
    out.write(f"pagedserve chat with {engine.model_name}. {HELP}\n")
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    while True:
        out.write("> ")
        out.flush()
        line = inp.readline()
        if not line or line.strip() in ("/exit", "/quit"):
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
        text, last = stream_reply(engine, prompt_ids, params, out)
        messages.append({"role": "assistant", "content": text})
        cached = last.num_cached_tokens if last else 0
        out.write(f"[{len(prompt_ids)} prompt tokens, {cached} from the prefix cache, "
                  f"{time.perf_counter() - start:.1f} s]\n")
