"""Sampler: last-position logits of a batch of sequences -> one token each, in a few batched tensor ops.

Per step, for logits [S, V] (one row per sequence that samples):
  1. banned tokens (min_tokens: EOS / stop tokens) -> -inf; repetition penalty over prompt+output tokens,
     then frequency and presence penalties over output tokens, then logit_bias; then, for rows that follow
     a grammar (structured output), every token the grammar does not allow -> -inf.
  2. logprobs, for rows that asked: log_softmax of these penalized logits, i.e. after penalties and bans but
     before temperature, min-p, top-k and top-p, so they describe the model and not the sampling knobs
     (vLLM's default, "raw" logprobs, likewise ignores the sampling knobs).
  3. greedy rows (temperature 0): argmax of the penalized logits.
  4. random rows: / temperature, then min-p, top-k, top-p (each a per-row threshold, ties kept),
     then one uniform u per row and an inverse-CDF draw (searchsorted of u in the row's cumulative probs).

Why inverse CDF and not the exponential race (argmax probs / Exp(1) noise): the race needs V random numbers
per row; on CPU drawing 256 x 49152 exponentials costs ~0.4 s a step (more than the model's forward), while
softmax + cumsum + searchsorted costs ~0.1 s. It keeps the race's useful properties: a seeded row draws its
one uniform from its own torch.Generator (so a seed gives the same text whatever else is in the batch, every
op being row-wise), and unseeded rows take one batched draw from the engine's generator.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Collection, Sequence

import torch

from pagedserve.device import to_device
from pagedserve.outputs import Logprob
from pagedserve.sampling_params import SamplingParams
from pagedserve.structured_output import mask_logits_

# Top-p looks for each row's nucleus among its best 256 tokens, then its best 4096, then in a full sort (on
# 2 CPU cores, per row of 49k: top-256 ~0.4 ms, top-4096 ~1.4 ms, sort ~5 ms). With SmolLM2-135M at
# temperature 1, the 0.9-nucleus is wider than 256 tokens at ~20% of steps, wider than 4096 at <1%.
TOP_P_CANDIDATES = (256, 4096)


def min_tokens_banned_ids(params: SamplingParams, num_output_tokens: int, eos_token_ids: Collection[int]) -> list[int]:
    """Token ids a row may not sample yet: EOS (unless ignore_eos) and stop_token_ids until min_tokens are out."""
    if num_output_tokens >= params.min_tokens:
        return []
    banned = set(params.stop_token_ids)
    if not params.ignore_eos:
        banned.update(eos_token_ids)
    return sorted(banned)


def _index(rows: list[int], device) -> torch.Tensor:
    return to_device(rows, device)


def _flat_positions(rows: Sequence[int], token_lists: Sequence[Sequence[int]], vocab_size: int,
                    device) -> torch.Tensor:
    """Positions row * V + token in flattened [S, V] logits, one per listed token (token_lists[j] is row rows[j]).

    A token outside [0, V) names no logit of its row (row * V + token would land in another row): it is
    dropped here, so no request's ids can reach a neighbour's logits whatever got past validation.
    """
    lengths = to_device([len(t) for t in token_lists], device)
    tokens = to_device(list(itertools.chain.from_iterable(token_lists)), device)
    row_of = torch.repeat_interleave(to_device(list(rows), device), lengths)
    inside = (tokens >= 0) & (tokens < vocab_size)
    return (row_of * vocab_size + tokens)[inside]


@dataclass
class SamplingBatch:
    """Per-step sampling state of a batch, built once by `build`. Row subsets are index tensors into [S];
    a None tensor means "no row needs this", so that work is skipped."""
    num_rows: int
    vocab_size: int
    # Bans (min_tokens): flat positions row * V + token to set to -inf.
    banned_positions: torch.Tensor | None = None
    # Penalties, sparse: only the (row, token) pairs that occurred are touched, O(tokens) and not O(S * V).
    repetition_positions: torch.Tensor | None = None  # [Nr] unique flat positions of prompt/output tokens
    repetition_penalty: torch.Tensor | None = None    # [Nr] the row's repetition penalty at each of them
    frequency_positions: torch.Tensor | None = None   # [Nf] unique flat positions of output tokens
    frequency_delta: torch.Tensor | None = None       # [Nf] frequency * count + presence, to subtract
    bias_positions: torch.Tensor | None = None        # [Nb] flat positions of logit_bias entries
    bias: torch.Tensor | None = None                  # [Nb] their biases, to add
    # Grammars: the rows that follow one and, per such row, which tokens it allows.
    grammar_rows: torch.Tensor | None = None          # [G]
    grammar_bitmask: torch.Tensor | None = None       # [G, ceil(V / 32)] int32 (structured_output.py)
    # Greedy and random rows.
    greedy_rows: torch.Tensor | None = None          # [G]
    random_rows: torch.Tensor | None = None          # [R]
    # The rest is indexed by position among the random rows.
    temperature: torch.Tensor | None = None          # [R, 1]; None when all are 1
    min_p: torch.Tensor | None = None                # [R, 1]; None when all are 0
    top_k_rows: torch.Tensor | None = None           # [Rk] random rows with 0 < top_k < V
    top_k: torch.Tensor | None = None                # [Rk, 1] int64
    top_k_max: int = 0                               # the largest of them (known here: no device read)
    top_p_rows: torch.Tensor | None = None           # [Rp] random rows with top_p < 1
    top_p: torch.Tensor | None = None                # [Rp, 1]
    seeded: list[tuple[int, torch.Generator]] = field(default_factory=list)  # (random position, its generator)
    unseeded: torch.Tensor | None = None             # [U] random positions drawing from `generator`
    generator: torch.Generator | None = None
    # Logprobs: rows that asked, how many top entries each wants (0: only the sampled token).
    logprob_rows: torch.Tensor | None = None          # [L]
    num_logprobs: list[int | None] = field(default_factory=list)  # per row of the batch
    max_logprobs: int = 0

    @classmethod
    def build(cls, params_list: Sequence[SamplingParams],
              output_token_ids_list: Sequence[Sequence[int]],
              prompt_token_ids_list: Sequence[Sequence[int]],
              generators: Sequence[torch.Generator | None],
              vocab_size: int,
              device: torch.device | str = "cpu",
              *,
              banned_token_ids: Sequence[Sequence[int] | None] | None = None,
              generator: torch.Generator | None = None,
              grammar: tuple[Sequence[int], torch.Tensor] | None = None) -> "SamplingBatch":
        """Row i samples for params_list[i], having produced output_token_ids_list[i] after
        prompt_token_ids_list[i]. generators[i]: the request's own generator (seeded requests) or None.
        banned_token_ids[i]: token ids row i may not sample (see min_tokens_banned_ids).
        generator: draws the uniforms of unseeded rows (any device); None uses torch's default generator.
        grammar: (rows, bitmask) for the rows that follow a grammar (structured_output.allowed_token_bitmask).
        Seeded rows' generators advance by one draw per step in which they sample at temperature > 0."""
        S, V = len(params_list), vocab_size
        b = cls(num_rows=S, vocab_size=V, generator=generator)

        def idx(rows):
            return _index(rows, device)

        def col(vals, dtype=torch.float32):  # a [n, 1] column, to broadcast over the vocabulary
            return to_device(vals, device, dtype).unsqueeze(1)

        if banned_token_ids is not None and any(banned_token_ids):
            b.banned_positions = _flat_positions(range(S), [list(t or []) for t in banned_token_ids], V, device)

        rep = [i for i, p in enumerate(params_list) if p.repetition_penalty != 1.0]
        if rep:
            seen = [list(prompt_token_ids_list[i]) + list(output_token_ids_list[i]) for i in rep]
            b.repetition_positions = torch.unique(_flat_positions(rep, seen, V, device))
            per_row = torch.ones(S, dtype=torch.float32, device=device)
            per_row[idx(rep)] = to_device([params_list[i].repetition_penalty for i in rep], device, torch.float32)
            b.repetition_penalty = per_row[b.repetition_positions // V]
        freq = [i for i, p in enumerate(params_list) if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0]
        if freq:
            pos = _flat_positions(freq, [output_token_ids_list[i] for i in freq], V, device)
            b.frequency_positions, counts = torch.unique(pos, return_counts=True)
            f = to_device([p.frequency_penalty for p in params_list], device, torch.float32)
            pr = to_device([p.presence_penalty for p in params_list], device, torch.float32)
            row_of = b.frequency_positions // V
            b.frequency_delta = f[row_of] * counts + pr[row_of]

        bias = [i for i, p in enumerate(params_list) if p.logit_bias]
        if bias:
            tokens = [list(params_list[i].logit_bias) for i in bias]
            b.bias_positions = _flat_positions(bias, tokens, V, device)
            values = [v for i in bias for t, v in params_list[i].logit_bias.items() if 0 <= t < V]
            b.bias = to_device(values, device, torch.float32)
        if grammar is not None and len(grammar[0]):
            b.grammar_rows, b.grammar_bitmask = idx(list(grammar[0])), to_device(grammar[1], device)

        greedy = [i for i, p in enumerate(params_list) if p.greedy]
        rand = [i for i, p in enumerate(params_list) if not p.greedy]
        if greedy:
            b.greedy_rows = idx(greedy)
        if rand:
            rp = [params_list[i] for i in rand]
            b.random_rows = idx(rand)
            if any(p.temperature != 1.0 for p in rp):
                b.temperature = col([p.temperature for p in rp])
            if any(p.min_p > 0.0 for p in rp):
                b.min_p = col([p.min_p for p in rp])
            tk = [j for j, p in enumerate(rp) if 0 < p.top_k < V]
            if tk:
                b.top_k_rows, b.top_k = idx(tk), col([rp[j].top_k for j in tk], torch.int64)
                b.top_k_max = max(rp[j].top_k for j in tk)
            tp = [j for j, p in enumerate(rp) if p.top_p < 1.0]
            if tp:
                b.top_p_rows, b.top_p = idx(tp), col([rp[j].top_p for j in tp])
            b.seeded = [(j, generators[i]) for j, i in enumerate(rand) if generators[i] is not None]
            unseeded = [j for j, i in enumerate(rand) if generators[i] is None]
            if unseeded:
                b.unseeded = idx(unseeded)

        b.num_logprobs = [p.logprobs for p in params_list]
        lp = [i for i, p in enumerate(params_list) if p.logprobs is not None]
        if lp:
            b.logprob_rows = idx(lp)
            b.max_logprobs = max(params_list[i].logprobs for i in lp)
        return b


@dataclass
class TokenLogprobs:
    """One generated token's log-probability, its rank (1 = most likely) and the row's top-N."""
    token_id: int
    logprob: float
    rank: int
    top_token_ids: list[int]
    top_logprobs: list[float]

    def as_dict(self) -> dict[int, Logprob]:
        """The sampled token and the top-N, as CompletionOutput.logprobs holds them."""
        d = {t: Logprob(lp, rank=r + 1) for r, (t, lp) in enumerate(zip(self.top_token_ids, self.top_logprobs))}
        d[self.token_id] = Logprob(self.logprob, rank=self.rank)
        return d


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Per row: None when that row did not ask for logprobs; the whole list is None when no row did.
    logprobs: list[TokenLogprobs | None] | None = None


def _take(x: torch.Tensor, rows: torch.Tensor | None, n: int) -> tuple[torch.Tensor, bool]:
    """(x[rows], whether it is a copy): the whole of x, uncopied, when rows are all n rows in order."""
    if rows is None or rows.numel() == n:  # subsets are built in increasing order, so all rows = arange
        return x, False
    return x[rows], True


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Bans, then repetition penalty (HF/vLLM: positive logits / r, negative * r, for tokens seen in prompt
    or output), then OpenAI's frequency and presence penalties (logit -= f * count + p * [count > 0]), then
    logit_bias (added), then the grammars' masks.
    logits: [S, V] contiguous, modified in place and returned."""
    flat = logits.view(-1)
    if batch.banned_positions is not None:
        flat[batch.banned_positions] = float("-inf")
    if batch.repetition_positions is not None:
        x, r = flat[batch.repetition_positions], batch.repetition_penalty
        flat[batch.repetition_positions] = torch.where(x > 0, x / r, x * r)
    if batch.frequency_positions is not None:
        flat[batch.frequency_positions] -= batch.frequency_delta
    if batch.bias_positions is not None:
        flat.index_add_(0, batch.bias_positions, batch.bias)
    if batch.grammar_rows is not None:
        mask_logits_(logits, batch.grammar_rows, batch.grammar_bitmask)
    return logits


def _mask_below(x: torch.Tensor, rows: torch.Tensor, threshold: torch.Tensor) -> None:
    """x[rows][x[rows] < threshold] = -inf, in place. threshold: [len(rows), 1]."""
    sub, copied = _take(x, rows, x.shape[0])
    sub = sub.masked_fill_(sub < threshold, float("-inf"))
    if copied:
        x[rows] = sub


def _top_p_threshold(vals: torch.Tensor, top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vals: [N, K] the best probabilities of each row, descending; top_p: [N, 1].
    Returns (threshold [N, 1]: the smallest probability in the nucleus, covered [N]: whether K was wide
    enough). The nucleus: the best tokens until the mass before the next one reaches top_p (at least one)."""
    cum = vals.cumsum(-1)
    before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=1)  # mass of the better tokens
    keep = (before < top_p) & (vals > 0)  # a prefix of each row: both sides are monotone
    n_keep = keep.sum(-1, keepdim=True)
    return vals.gather(1, n_keep - 1), ~keep[:, -1]


def apply_top_k_top_p(x: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """x: [R, V] temperature-scaled logits of the random rows, masked in place: min-p (keep p >= min_p * p_max,
    i.e. logit >= max + log(min_p)), then top-k, then top-p over the distribution that top-k left. Each is a
    threshold per row, so ties at the edge are all kept and a row's result never depends on its batch."""
    if batch.min_p is not None:
        x_max = x.max(dim=-1, keepdim=True).values
        x.masked_fill_(x < x_max + torch.log(batch.min_p), float("-inf"))  # log(0) = -inf keeps everything
    if batch.top_k_rows is not None:
        sub, _ = _take(x, batch.top_k_rows, x.shape[0])
        best = sub.topk(batch.top_k_max, dim=-1).values  # [Rk, kmax], descending
        _mask_below(x, batch.top_k_rows, best.gather(1, batch.top_k - 1))
    if batch.top_p_rows is not None:
        sub, copied = _take(x, batch.top_p_rows, x.shape[0])
        probs = torch.softmax(sub, dim=-1)  # [Rp, V]
        V = sub.shape[1]
        windows = [k for k in TOP_P_CANDIDATES if k < V] + [V]
        threshold, covered = _top_p_threshold(probs.topk(windows[0], dim=-1).values, batch.top_p)
        for k in windows[1:]:  # rows whose nucleus is wider than the window look again, wider
            if bool(covered.all()):
                break
            wide = (~covered).nonzero().squeeze(1)
            p = probs[wide]
            vals = p.topk(k, dim=-1).values if k < V else p.sort(dim=-1, descending=True).values
            threshold[wide], covered[wide] = _top_p_threshold(vals, batch.top_p[wide])
        sub.masked_fill_(probs < threshold, float("-inf"))
        if copied:
            x[batch.top_p_rows] = sub
    return x


def _uniforms(batch: SamplingBatch, device) -> torch.Tensor:
    """u: [R] in [0, 1): seeded rows from their own generator, the others from one batched draw."""
    u = torch.empty(batch.random_rows.numel(), dtype=torch.float32, device=device)
    if batch.unseeded is not None:
        gen = batch.generator
        u[batch.unseeded] = torch.rand(batch.unseeded.numel(), generator=gen,
                                       device=gen.device if gen is not None else device).to(device)
    for j, g in batch.seeded:
        u[j] = torch.rand((), generator=g, device=g.device).to(device)
    return u


def draw(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling. x: [R, V] logits (-inf = excluded), u: [R] uniforms in [0, 1) -> tokens [R]."""
    cdf = torch.softmax(x, dim=-1).cumsum_(-1)  # [R, V]
    total = cdf[:, -1:]
    # Strictly below the total, so the draw lands on a token with positive probability.
    v = torch.minimum(u.unsqueeze(1) * total, torch.nextafter(total, torch.zeros_like(total)))
    tokens = torch.searchsorted(cdf, v, right=True).squeeze(1)
    return tokens.clamp_(max=x.shape[1] - 1)


def _token_logprobs(lp: torch.Tensor, tokens: torch.Tensor, top_n: int) -> list[TokenLogprobs]:
    """lp: [n, V] log-probs; tokens: [n] int64 -> each token's log-prob and rank (1 = likeliest), and its row's
    top_n. A grammar or a ban can leave fewer than top_n possible tokens: the impossible ones (-inf) are not
    listed (and -inf is not JSON)."""
    chosen = lp.gather(1, tokens.unsqueeze(1))  # [n, 1]
    ranks = ((lp > chosen).sum(-1) + 1).tolist()
    top = lp.topk(top_n, dim=-1) if top_n > 0 else None
    top_i = top.indices.tolist() if top is not None else [[]] * len(ranks)
    top_v = top.values.tolist() if top is not None else [[]] * len(ranks)
    out = []
    for t, c, r, ti, tv in zip(tokens.tolist(), chosen.squeeze(1).tolist(), ranks, top_i, top_v):
        kept = [(i, v) for i, v in zip(ti, tv) if v != float("-inf")]
        out.append(TokenLogprobs(t, c, r, [i for i, _ in kept], [v for _, v in kept]))
    return out


def _logprobs(lp: torch.Tensor, tokens: torch.Tensor, batch: SamplingBatch) -> list[TokenLogprobs | None]:
    """lp: [L, V] log-probs of the rows that asked; tokens: [L] their sampled tokens."""
    out: list[TokenLogprobs | None] = [None] * batch.num_rows
    for i, entry in zip(batch.logprob_rows.tolist(), _token_logprobs(lp, tokens, batch.max_logprobs)):
        n = batch.num_logprobs[i]  # the row's own top-N, of the batch's largest
        entry.top_token_ids, entry.top_logprobs = entry.top_token_ids[:n], entry.top_logprobs[:n]
        out[i] = entry
    return out


def logprobs_of(logits: torch.Tensor, token_ids: Sequence[int], top_n: int) -> list[TokenLogprobs]:
    """Raw log-probabilities (no penalty, bias or grammar) of token_ids[i] under logits[i], with its rank and
    the row's top_n: what prompt_logprobs reports. logits: [n, V] float32."""
    tokens = torch.tensor(list(token_ids), dtype=torch.int64, device=logits.device)
    return _token_logprobs(torch.log_softmax(logits, dim=-1), tokens, top_n)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
    """logits: [S, V] float32 last-position logits, one row per sequence of `batch` (consumed: modified in
    place). Returns one token per row and, when any row asked, its logprobs (see the module docstring)."""
    S, V = logits.shape
    if (S, V) != (batch.num_rows, batch.vocab_size):
        raise ValueError(f"logits {(S, V)}, batch {(batch.num_rows, batch.vocab_size)}")
    logits = apply_penalties(logits.contiguous(), batch)
    tokens = torch.empty(S, dtype=torch.int64, device=logits.device)
    lp = None
    if batch.logprob_rows is not None:
        lp = torch.log_softmax(_take(logits, batch.logprob_rows, S)[0], dim=-1)  # [L, V], a new tensor
    if batch.greedy_rows is not None:
        g, _ = _take(logits, batch.greedy_rows, S)
        tokens[batch.greedy_rows] = g.argmax(dim=-1)
    if batch.random_rows is not None:
        # All rows random: nothing else reads the logits any more, so scale them in place.
        x, _ = _take(logits, batch.random_rows, S)  # x: [R, V]
        if batch.temperature is not None:
            x.div_(batch.temperature)
        x = apply_top_k_top_p(x, batch)
        tokens[batch.random_rows] = draw(x, _uniforms(batch, logits.device))
    token_list = tokens.tolist()
    if lp is None:
        return SamplerOutput(token_list)
    return SamplerOutput(token_list, _logprobs(lp, tokens[batch.logprob_rows], batch))
