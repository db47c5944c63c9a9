"""Beam search's bookkeeping: which continuations of a beam set live on, which finish, when the search ends.

The rules are transformers' `generate(num_beams=k, do_sample=False)` (5.x `_beam_search`), so results match it:
  - every live beam's float32 log-softmax plus its cumulative log-probability, flattened beam-major; the best
    2k (in general max(2, 1 + number of EOS ids) * k) candidates over all of them, best first;
  - a candidate ending in EOS, or reaching max_tokens, finishes only if it ranks among the first k; it scores
    cum_logprob / generated_length ** length_penalty (generated tokens, the EOS included, not the prompt);
    the k best finished hypotheses are kept;
  - the first k candidates that did not finish are the next live beams;
  - the search ends at max_tokens, or once k hypotheses are kept and: early_stopping=True; False: the best live
    beam, penalized at its current length, cannot beat the worst kept; "never": the same at max_tokens' length
    when length_penalty > 0 (an exact bound).
The engine owns the beams' sequences and KV blocks (a continuation forks its parent's block table); this module
sees only log-probabilities and token lists.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Collection, Sequence

import torch


@dataclass
class BeamHypothesis:
    output_token_ids: list[int]  # generated tokens, the EOS included when it ended the beam
    cum_logprob: float           # sum of the tokens' log-probabilities
    score: float                 # cum_logprob / len(output_token_ids) ** length_penalty


@dataclass
class Continuation:
    parent: int          # index of the live beam it extends
    token_id: int
    cum_logprob: torch.Tensor  # float32 0-d: kept in float32, as the reference accumulates


@dataclass
class BeamStep:
    continuations: list[Continuation]  # the next live beams, best first
    finished: bool                     # the search is over: the kept hypotheses are the result


@dataclass
class BeamSearchState:
    beam_width: int
    max_tokens: int
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    eos_token_ids: Collection[int] = ()
    hypotheses: list[BeamHypothesis] = field(default_factory=list)  # best first, at most beam_width

    def step(self, logprobs: torch.Tensor, cum_logprobs: torch.Tensor, outputs: Sequence[list[int]]) -> BeamStep:
        """One step over the live beams. logprobs: [nb, V] float32 log-softmax of each live beam's next-token
        logits; cum_logprobs: [nb] float32; outputs[b]: beam b's generated tokens so far (all the same length)."""
        k, V = self.beam_width, logprobs.shape[1]
        acc = (logprobs + cum_logprobs[:, None]).reshape(-1)
        top_s, top_i = torch.topk(acc, k=min(max(2, 1 + len(self.eos_token_ids)) * k, acc.numel()))
        gen_len = len(outputs[0]) + 1
        continuations, new = [], []
        for rank, (s, i) in enumerate(zip(top_s, top_i.tolist())):
            parent, token = divmod(i, V)
            if token in self.eos_token_ids or gen_len >= self.max_tokens:
                if rank < k:  # a finished candidate ranked below the first k is dropped
                    cum = float(s)
                    new.append(BeamHypothesis(outputs[parent] + [token], cum, float(s / gen_len ** self.length_penalty)))
            elif len(continuations) < k:
                continuations.append(Continuation(parent, token, s))
        # Keep the k best; on equal scores the older hypothesis stays ahead (a stable sort).
        self.hypotheses = sorted(self.hypotheses + new, key=lambda h: -h.score)[:k]
        if gen_len >= self.max_tokens or not continuations:
            return BeamStep([], True)
        return BeamStep(continuations, self._done(continuations[0].cum_logprob, gen_len))

    def _done(self, best_live_cum: torch.Tensor, gen_len: int) -> bool:
        if len(self.hypotheses) < self.beam_width:
            return False
        if self.early_stopping is True:
            return True
        length = self.max_tokens if self.early_stopping == "never" and self.length_penalty > 0 else gen_len
        return not float(best_live_cum / length ** self.length_penalty) > self.hypotheses[-1].score
