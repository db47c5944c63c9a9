"""Sampler: greedy, temperature, min-p / top-k / top-p, penalties, seeds, bans, logprobs."""
import math

import pytest
import torch

from pagedserve.sampler import SamplingBatch, apply_penalties, apply_top_k_top_p, min_tokens_banned_ids, sample
from pagedserve.sampling_params import SamplingParams

V = 50


def build(params, outputs=None, prompts=None, generators=None, vocab=V, **kw):
    n = len(params)
    return SamplingBatch.build(params, outputs or [[] for _ in range(n)], prompts or [[] for _ in range(n)],
                               generators or [None] * n, vocab, "cpu", **kw)


def run(logits, params, **kw):
    return sample(logits.clone(), build(params, vocab=logits.shape[1], **kw))


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def logits():
    return torch.randn(6, V, generator=gen(0)) * 3


def test_greedy_is_argmax(logits):
    out = run(logits, [SamplingParams(temperature=0)] * 6)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs is None


def test_top_k_1_and_tiny_top_p_equal_greedy(logits):
    want = logits.argmax(-1).tolist()
    for p in (SamplingParams(temperature=1.5, top_k=1), SamplingParams(temperature=1.5, top_p=1e-6),
              SamplingParams(temperature=1.0, min_p=1.0)):
        for seed in range(3):
            assert run(logits, [p] * 6, generator=gen(seed)).token_ids == want


def frequencies(logits_row, params, n=20000, seed=0):
    """Empirical distribution of n draws for one logits row (n rows of one batch)."""
    out = run(logits_row.expand(n, -1), [params] * n, generator=gen(seed))
    return torch.bincount(torch.tensor(out.token_ids), minlength=logits_row.numel()).float() / n


ROW = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


@pytest.mark.parametrize("t", [0.5, 1.0, 2.0])
def test_temperature_distribution(t):
    freq = frequencies(ROW, SamplingParams(temperature=t))
    want = torch.softmax(ROW / t, -1)
    assert (freq - want).abs().max() < 0.015, (freq, want)


def test_top_k_top_p_min_p_support_and_renormalisation():
    probs = torch.softmax(ROW, -1)  # [0.55, 0.20, 0.12, 0.07, 0.03, 0.003] roughly
    # top-k 3: the three best, renormalised.
    freq = frequencies(ROW, SamplingParams(top_k=3))
    want = torch.zeros(6)
    want[:3] = probs[:3] / probs[:3].sum()
    assert (freq - want).abs().max() < 0.015
    # top-p 0.7: 0.55 < 0.7, 0.55 + 0.20 >= 0.7, so the nucleus is the two best.
    freq = frequencies(ROW, SamplingParams(top_p=0.7))
    assert freq[:2].sum() == 1 and freq[0] > 0.6 and freq[1] > 0.2
    # min-p 0.2: keep p >= 0.2 * 0.55 = 0.11, i.e. tokens 0, 1, 2.
    freq = frequencies(ROW, SamplingParams(min_p=0.2))
    assert freq[:3].sum() == 1 and (freq[:3] > 0.05).all()
    # top-k 3 then top-p 0.8 over the renormalised top 3 (0.63, 0.23, 0.14): tokens 0, 1.
    freq = frequencies(ROW, SamplingParams(top_k=3, top_p=0.8))
    assert freq[:2].sum() == 1 and freq[1] > 0.2


def test_top_p_threshold_wide_nucleus_uses_full_sort():
    # A flat row whose nucleus is wider than the first top-p candidate window (256): the full-sort fallback.
    V2 = 1000
    x = torch.linspace(0, 1, V2).unsqueeze(0).repeat(2, 1)
    b = build([SamplingParams(top_p=0.9), SamplingParams(top_p=0.05)], vocab=V2)
    masked = apply_top_k_top_p(x.clone(), b)
    p = torch.softmax(x[0], -1).flip(0)  # descending
    before = torch.cumsum(p, 0) - p
    n_keep = int((before < 0.9).sum())
    assert n_keep > 256
    assert int(torch.isfinite(masked[0]).sum()) == n_keep
    # The kept tokens are the best ones.
    assert torch.isfinite(masked[0, V2 - n_keep:]).all()
    n_keep = int((before < 0.05).sum())
    assert int(torch.isfinite(masked[1]).sum()) == n_keep


def test_penalties_follow_the_formulas():
    x = torch.tensor([[2.0, -1.0, 0.5, -0.5, 3.0, 0.0],
                      [1.0, 1.0, -2.0, 4.0, -3.0, 0.5],
                      [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
                      [1.0, -2.0, 3.0, 4.0, 5.0, 6.0]])
    params = [SamplingParams(repetition_penalty=2.0),
              SamplingParams(frequency_penalty=0.5, presence_penalty=0.25, repetition_penalty=1.5),
              SamplingParams(),  # no penalty: untouched
              SamplingParams(frequency_penalty=-0.5, presence_penalty=1.0)]  # prompt tokens do not count
    prompts = [[0, 1], [5], [0, 1, 2], [1, 2]]
    outputs = [[1, 3, 3], [2, 2, 4], [3, 3], [0, 0, 0, 5]]
    got = apply_penalties(x.clone(), build(params, outputs, prompts, vocab=6))
    want = x.clone()
    # Row 0: tokens 0, 1, 3 seen; positive / 2, negative * 2.
    want[0, 0], want[0, 1], want[0, 3] = 1.0, -2.0, -1.0
    # Row 1: seen 5, 2, 4 -> repetition 1.5 first; then counts {2: 2, 4: 1}.
    want[1, 5] = 0.5 / 1.5
    want[1, 2] = -2.0 * 1.5 - 0.5 * 2 - 0.25
    want[1, 4] = -3.0 * 1.5 - 0.5 * 1 - 0.25
    # Row 3: counts {0: 3, 5: 1}.
    want[3, 0] = 1.0 + 0.5 * 3 - 1.0
    want[3, 5] = 6.0 + 0.5 * 1 - 1.0
    torch.testing.assert_close(got, want)


def test_penalties_change_the_greedy_choice():
    x = torch.tensor([[5.0, 4.9, 0.0]])
    assert run(x, [SamplingParams(temperature=0)], outputs=[[0]]).token_ids == [0]
    assert run(x, [SamplingParams(temperature=0, presence_penalty=0.2)], outputs=[[0]]).token_ids == [1]
    assert run(x, [SamplingParams(temperature=0, repetition_penalty=1.1)], prompts=[[0]]).token_ids == [1]


def test_seeded_rows_do_not_depend_on_the_batch(logits):
    seeded = SamplingParams(temperature=1.0, seed=7, top_p=0.9)

    def tokens_alone(row, steps=5):
        g = gen(7)
        return [run(logits[row:row + 1], [seeded], generators=[g]).token_ids[0] for _ in range(steps)]

    def tokens_batched(row, steps=5, batch_seed=0):
        g = gen(7)
        params = [SamplingParams(temperature=0), SamplingParams(temperature=2.0, top_k=5), seeded,
                  SamplingParams(temperature=0.7), SamplingParams(min_p=0.1), SamplingParams(top_p=0.5)]
        rows = [0, 1, row, 3, 4, 5]
        gens = [None, None, g, None, None, None]
        return [run(logits[rows], params, generators=gens, generator=gen(batch_seed + s)).token_ids[2]
                for s in range(steps)]

    for row in (2, 3):
        alone = tokens_alone(row)
        assert tokens_batched(row) == alone == tokens_batched(row, batch_seed=100)
        assert tokens_alone(row) == alone  # a new generator with the same seed
    # Sanity: the draws really are random (a fixed row at temperature 1 does not always give one token).
    assert len(set(tokens_alone(2, steps=30))) > 1


def test_unseeded_rows_reproduce_with_the_engine_generator(logits):
    params = [SamplingParams(temperature=1.0)] * 6
    a = run(logits, params, generator=gen(3)).token_ids
    assert run(logits, params, generator=gen(3)).token_ids == a
    assert any(run(logits, params, generator=gen(s)).token_ids != a for s in range(4, 8))


def test_banned_tokens_are_never_sampled(logits):
    best = logits.argmax(-1).tolist()
    banned = [[t] for t in best]
    params = [SamplingParams(temperature=0), SamplingParams(temperature=5.0)] * 3
    for seed in range(20):
        out = run(logits, params, banned_token_ids=banned, generator=gen(seed))
        assert all(t != b for t, b in zip(out.token_ids, best))
    # Banning all but one token forces it, even at a high temperature.
    allowed = 17
    out = run(logits, [SamplingParams(temperature=5.0)] * 6,
              banned_token_ids=[[t for t in range(V) if t != allowed]] * 6)
    assert out.token_ids == [allowed] * 6


def test_min_tokens_banned_ids():
    p = SamplingParams(min_tokens=3, stop_token_ids=[5, 6])
    assert sorted(min_tokens_banned_ids(p, 0, eos_token_ids={2})) == [2, 5, 6]
    assert min_tokens_banned_ids(p, 3, eos_token_ids={2}) == []
    p = SamplingParams(min_tokens=3, ignore_eos=True)
    assert min_tokens_banned_ids(p, 1, eos_token_ids={2}) == []


def test_logprobs_are_log_softmax_with_ranks(logits):
    params = [SamplingParams(temperature=0, logprobs=3), SamplingParams(temperature=0.8, logprobs=0),
              SamplingParams(temperature=1.0), SamplingParams(temperature=0.5, top_k=2, logprobs=5),
              SamplingParams(temperature=0, logprobs=1, frequency_penalty=1.0), SamplingParams(top_p=0.3)]
    outputs = [[], [], [], [], [int(logits[4].argmax())] * 2, []]
    out = run(logits, params, outputs=outputs, generator=gen(1))
    penalized = logits.clone()
    penalized[4, outputs[4][0]] -= 2.0
    lp = torch.log_softmax(penalized, -1)
    assert out.logprobs[2] is None and out.logprobs[5] is None
    for i, n in [(0, 3), (1, 0), (3, 5), (4, 1)]:
        r = out.logprobs[i]
        t = out.token_ids[i]
        assert r.token_id == t
        assert math.isclose(r.logprob, lp[i, t].item(), rel_tol=1e-5, abs_tol=1e-6)
        assert r.rank == int((lp[i] > lp[i, t]).sum()) + 1
        order = lp[i].argsort(descending=True)[:n]
        assert r.top_token_ids == order.tolist()
        torch.testing.assert_close(torch.tensor(r.top_logprobs), lp[i, order])
        d = r.as_dict()
        assert d[t].rank == r.rank and set(d) == set(order.tolist()) | {t}
    # Greedy rows sample rank 1; the top-k=2 row samples rank 1 or 2 (logprobs ignore top-k / temperature).
    assert out.logprobs[0].rank == 1 and out.logprobs[4].rank == 1
    assert out.logprobs[3].rank in (1, 2)
    # The penalty moved row 4 off its raw argmax.
    assert out.token_ids[4] != outputs[4][0]
    # All rows random (the logits are then scaled in place): logprobs still ignore the temperature.
    out = run(logits, [SamplingParams(temperature=0.5, logprobs=2)] * 6, generator=gen(2))
    lp = torch.log_softmax(logits, -1)
    got = torch.tensor([r.logprob for r in out.logprobs])
    torch.testing.assert_close(got, lp[torch.arange(6), torch.tensor(out.token_ids)])
    torch.testing.assert_close(torch.tensor([r.top_logprobs for r in out.logprobs]), lp.topk(2).values)


def test_mixed_batch_in_one_call(logits):
    params = [SamplingParams(temperature=0), SamplingParams(seed=1, top_k=3), SamplingParams(temperature=0.9),
              SamplingParams(top_p=0.8, top_k=10), SamplingParams(min_p=0.3, temperature=1.3),
              SamplingParams(temperature=0, repetition_penalty=1.3)]
    b = build(params, outputs=[[1, 2]] * 6, prompts=[[3]] * 6,
              generators=[None, gen(1), None, None, None, None], generator=gen(0))
    assert b.frequency_positions is None  # only what is needed is built
    assert b.repetition_positions.tolist() == [5 * V + t for t in (1, 2, 3)]  # one row, unique tokens
    out = sample(logits.clone(), b)
    assert len(out.token_ids) == 6 and out.logprobs is None
    assert out.token_ids[0] == int(logits[0].argmax())
    assert out.token_ids[1] in logits[1].topk(3).indices.tolist()
    assert out.token_ids[3] in logits[3].topk(10).indices.tolist()
    p4 = torch.softmax(logits[4] / 1.3, -1)
    assert p4[out.token_ids[4]] >= 0.3 * p4.max()


def test_nothing_built_for_plain_requests():
    b = build([SamplingParams(temperature=0)] * 3)
    assert b.random_rows is None and b.logprob_rows is None
    assert b.repetition_positions is None and b.frequency_positions is None
    assert b.banned_positions is None
    b = build([SamplingParams()] * 3)
    assert b.temperature is None and b.min_p is None and b.top_k_rows is None and b.top_p_rows is None


def test_top_p_does_not_depend_on_the_candidate_window(monkeypatch, logits):
    import pagedserve.sampler as sampler_mod
    params = [SamplingParams(top_p=p, top_k=k) for p, k in
              [(0.9, 0), (0.5, 0), (0.99, 20), (0.3, 3), (0.95, 0), (0.7, 40)]]
    results = []
    for windows in [(2,), (2, 8), ()]:  # () = a full sort at once
        monkeypatch.setattr(sampler_mod, "TOP_P_CANDIDATES", windows)
        results.append(apply_top_k_top_p(logits.clone(), build(params)))
    torch.testing.assert_close(results[0], results[2])
    torch.testing.assert_close(results[1], results[2])
    assert (torch.isinf(results[2]).sum(-1) > 0).all()  # every row was cut
