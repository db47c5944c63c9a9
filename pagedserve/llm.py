"""LLM: the offline API (vLLM's names): generate and chat over a batch, results in input order."""
from __future__ import annotations

import time
from typing import Sequence

from tqdm import tqdm

from pagedserve.config import EngineConfig
from pagedserve.engine import LLMEngine
from pagedserve.outputs import BeamSearchOutput, BeamSearchSequence, CompletionOutput, RequestOutput
from pagedserve.sampling_params import BeamSearchParams, SamplingParams
from pagedserve.tokenizer import apply_chat_template


def merge_output(acc: RequestOutput | None, delta: RequestOutput) -> RequestOutput:
    """Fold a step's delta into the accumulated output of the same request."""
    if acc is None:
        acc = RequestOutput(delta.request_id, delta.prompt, delta.prompt_token_ids, [], False)
    by_index = {o.index: o for o in acc.outputs}
    for d in delta.outputs:
        o = by_index.get(d.index)
        if o is None:
            o = by_index[d.index] = CompletionOutput(d.index, "", [], logprobs=[] if d.logprobs is not None else None)
        o.text += d.text
        o.token_ids.extend(d.token_ids)
        if d.logprobs is not None:
            o.logprobs.extend(d.logprobs)
        o.cumulative_logprob = d.cumulative_logprob
        o.finish_reason, o.stop_reason = d.finish_reason, d.stop_reason
    acc.outputs = [by_index[i] for i in sorted(by_index)]
    acc.finished = delta.finished
    acc.num_cached_tokens = delta.num_cached_tokens
    acc.metrics = delta.metrics
    if delta.prompt_logprobs is not None:
        acc.prompt_logprobs = delta.prompt_logprobs
    return acc


class LLM:
    def __init__(self, model: str | None = None, **engine_options) -> None:
        self.llm_engine = LLMEngine(EngineConfig.from_kwargs(model=model, **engine_options))

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def stats(self) -> dict:
        return self.llm_engine.stats()

    def shutdown(self) -> None:
        """Stop the tensor-parallel worker processes now (they also stop when the LLM is collected or the
        interpreter exits)."""
        self.llm_engine.shutdown()

    def generate(self, prompts, sampling_params: SamplingParams | BeamSearchParams | Sequence | None = None,
                 use_tqdm: bool = True, cache_salt: str | None = None) -> list[RequestOutput]:
        """prompts: str | list[str] | list[{"prompt_token_ids": [...]}]; one SamplingParams or one per prompt."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        params = sampling_params if isinstance(sampling_params, (list, tuple)) else [sampling_params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        engine = self.llm_engine
        ids = []
        try:
            for p, sp in zip(prompts, params):
                ids.append(engine.add_request(None, p, sp, cache_salt=cache_salt))
        except Exception:
            engine.abort_request(ids)
            raise
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", unit="req", disable=not use_tqdm, dynamic_ncols=True)
        start, out_tokens = time.perf_counter(), 0
        try:
            while len(results) < len(ids) or any(not r.finished for r in results.values()):
                for delta in engine.step():
                    results[delta.request_id] = merge_output(results.get(delta.request_id), delta)
                    out_tokens += sum(len(o.token_ids) for o in delta.outputs)
                    if delta.finished:
                        bar.update(1)
                bar.set_postfix_str(f"{out_tokens / max(time.perf_counter() - start, 1e-9):.1f} output tok/s", refresh=False)
        except BaseException:
            engine.abort_request(ids)
            raise
        finally:
            bar.close()
        return [results[i] for i in ids]

    def beam_search(self, prompts, params: BeamSearchParams, use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """One beam search per prompt (str, token ids, or {"prompt_token_ids": [...]}), run inside the engine
        and batched with each other: beams share their prefix's KV blocks. Results in input order."""
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        results = []
        for out in self.generate(list(prompts), [params] * len(prompts), use_tqdm=use_tqdm):
            results.append(BeamSearchOutput([
                BeamSearchSequence(out.prompt_token_ids + c.token_ids, c.text, c.cumulative_logprob,
                                   c.cumulative_logprob / max(len(c.token_ids), 1) ** params.length_penalty,
                                   c.finish_reason) for c in out.outputs]))
        return results

    def chat(self, messages, sampling_params: SamplingParams | None = None, use_tqdm: bool = True,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """messages: one conversation (a list of {"role", "content"}) or a list of conversations."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tok = self.llm_engine.tokenizer
        prompts = [{"prompt_token_ids": apply_chat_template(tok, c, add_generation_prompt=add_generation_prompt)}
                   for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)
