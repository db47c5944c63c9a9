"""What a grammar-constrained step costs: decode steps of one batch with and without structured output.

    python -m benchmarks.grammar_step [--batch 1,16,64] [--steps 24] [--model PATH]

For each batch size, the same B prompts decode --steps tokens (after their prefill), once free and once with
every row under a JSON schema (a free string field, so no row's grammar ends early) and once under a regex,
in the same process, alternating. Prints the median step time of each, the ratio, and the time of the grammar
work alone (filling B bitmasks from xgrammar's matchers, and masking the logits in the sampler).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from pagedserve import SamplingParams
from pagedserve.engine import LLMEngine
from pagedserve.sampler import SamplingBatch, apply_penalties
from pagedserve.sampling_params import StructuredOutputsParams
from pagedserve.structured_output import GrammarState, allowed_token_bitmask

SCHEMA = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}
GRAMMARS = {"none": None, "json_schema": StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True),
            "regex": StructuredOutputsParams(regex=r"[a-z ,.]+")}


def decode_step_times(engine: LLMEngine, batch: int, steps: int, grammar) -> list[float]:
    """Seconds of each pure-decode step of `batch` requests (their prefill steps are not counted)."""
    prompt = "Write a long story about a lighthouse keeper and the sea."
    params = SamplingParams(max_tokens=steps + 1, temperature=0.7, seed=0, ignore_eos=True, structured_outputs=grammar)
    ids = [engine.add_request(None, engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False), params) for _ in range(batch)]
    times = []
    while engine.has_unfinished_requests():
        decoding = all(s.seq.num_output_tokens > 0 for g in engine.groups.values() for s in g.samples)
        t = time.perf_counter()
        engine.step()
        if decoding and len(engine.groups) == batch:
            times.append(time.perf_counter() - t)
    engine.abort_request(ids)
    return times


def grammar_work(engine: LLMEngine, batch: int, grammar) -> tuple[float, float]:
    """(ms to fill the bitmasks of `batch` fresh sequences, ms to mask [batch, V] logits with them)."""
    V = engine.model_config.vocab_size
    compiled = engine.structured_output.compile(grammar)
    states = [GrammarState(compiled) for _ in range(batch)]
    fills, masks = [], []
    for _ in range(20):
        t = time.perf_counter()
        bitmask = allowed_token_bitmask(states, V)
        fills.append(time.perf_counter() - t)
        sb = SamplingBatch.build([SamplingParams()] * batch, [[]] * batch, [[]] * batch, [None] * batch, V,
                                 grammar=(list(range(batch)), bitmask))
        logits = torch.randn(batch, V)
        t = time.perf_counter()
        apply_penalties(logits, sb)
        masks.append(time.perf_counter() - t)
    return statistics.median(fills) * 1e3, statistics.median(masks) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", default="1,16,64")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    engine = LLMEngine(model=args.model, max_model_len=1024)
    print(f"model {engine.model_name}, dtype {engine.dtype}, {torch.get_num_threads()} threads")
    print(f"{'batch':>5} {'grammar':>12} {'step ms':>8} {'x none':>7} {'fill ms':>8} {'mask ms':>8}")
    for batch in (int(b) for b in args.batch.split(",")):
        times = {name: [] for name in GRAMMARS}
        for _ in range(args.rounds):  # alternate, so drift in the machine's speed hits each alike
            for name, grammar in GRAMMARS.items():
                times[name] += decode_step_times(engine, batch, args.steps, grammar)
        base = statistics.median(times["none"])
        for name, grammar in GRAMMARS.items():
            step = statistics.median(times[name])
            fill, mask = grammar_work(engine, batch, grammar) if grammar is not None else (0.0, 0.0)
            print(f"{batch:>5} {name:>12} {step * 1e3:8.1f} {step / base:7.3f} {fill:8.2f} {mask:8.2f}")


if __name__ == "__main__":
    main()
