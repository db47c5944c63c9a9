"""beam_search.py's rules against transformers' generate(num_beams=k, do_sample=False): the same hypotheses, in the
same order, for widths 2-6, every early_stopping mode and several length penalties, on a tiny random LLaMA whose
EOS is made likely so that beams finish (and every way of stopping happens)."""
import collections

import pytest
import torch

from pagedserve.beam_search import BeamSearchState

V, MAX_NEW = 300, 8


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2,  # peaky: no near-ties
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    m = LlamaForCausalLM(cfg).eval()
    m.generation_config.pad_token_id = 0
    return m


def next_logprobs(model, rows):
    """Float32 log-softmax at the last position of each row: a full forward with the LM head on the last position
    only, as generate runs it (the matmul's shape changes the last bits)."""
    with torch.no_grad():
        logits = model(torch.tensor(rows), logits_to_keep=1).logits[:, -1, :].float()
    return torch.log_softmax(logits, dim=-1)


def search(model, prompt, k, lp, early, eos, stops):
    """Our rules, driven by plain forwards; the first step runs k copies of the prompt, as generate does."""
    state = BeamSearchState(k, MAX_NEW, lp, early, [eos])
    outputs, cums = [[]], torch.zeros(1)
    while True:
        rows = [prompt + o for o in outputs]
        lps = next_logprobs(model, rows * k if not outputs[0] else rows)[:len(rows)]
        step = state.step(lps, cums, outputs)
        if step.finished:
            stops[f"{len(outputs[0]) + 1} tokens"] += 1
            return state.hypotheses
        outputs = [outputs[c.parent] + [c.token_id] for c in step.continuations]
        cums = torch.stack([c.cum_logprob for c in step.continuations])


def test_beam_search_equals_transformers(model):
    stops = collections.Counter()
    torch.manual_seed(1)
    prompts = [torch.randint(3, V, (n,)).tolist() for n in (5, 11)]
    # An EOS each prompt's beams like, made likelier still, so that searches end before max_new_tokens too.
    eos_ids = []
    for p in prompts:
        hyps = search(model, p, 6, 1.0, False, -1, collections.Counter())
        eos_ids.append(collections.Counter(t for h in hyps for t in h.output_token_ids[1:]).most_common(1)[0][0])
    with torch.no_grad():
        for e in set(eos_ids):
            model.lm_head.weight[e] *= 2.0
    ended_by_eos = 0
    for prompt, eos in zip(prompts, eos_ids):
        for k in range(2, 7):
            for early in (True, False, "never"):
                for lp in (1.0, 0.0, 2.0):
                    ours = search(model, prompt, k, lp, early, eos, stops)
                    with torch.no_grad():
                        ref = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                             num_beams=k, do_sample=False, early_stopping=early, length_penalty=lp,
                                             max_new_tokens=MAX_NEW, num_return_sequences=k, output_scores=True,
                                             return_dict_in_generate=True, eos_token_id=eos)
                    assert len(ours) == k
                    for h, seq, score in zip(ours, ref.sequences.tolist(), ref.sequences_scores.tolist()):
                        gen = seq[len(prompt):]
                        if eos in gen:  # generate pads finished hypotheses after their EOS
                            gen = gen[:gen.index(eos) + 1]
                        assert h.output_token_ids == gen, (k, early, lp)
                        assert abs(h.score - score) < 1e-4, (k, early, lp)
                        ended_by_eos += h.output_token_ids[-1] == eos
    assert ended_by_eos > 50
    assert len(stops) > 1, stops  # searches ended at different lengths: early stops happened
