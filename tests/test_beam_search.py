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


# ---- in the engine ------------------------------------------------------------------------------------
def hf_beams(ref, prompt, k, lp, early, max_new):
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           num_beams=k, do_sample=False, early_stopping=early, length_penalty=lp,
                           max_new_tokens=max_new, num_return_sequences=k, output_scores=True,
                           return_dict_in_generate=True)
    eos = ref.generation_config.eos_token_id
    result = []
    for seq, score in zip(out.sequences.tolist(), out.sequences_scores.tolist()):
        gen = seq[len(prompt):]
        result.append((gen[:gen.index(eos) + 1] if eos in gen else gen, score))
    return result


@pytest.fixture(scope="module")
def tiny_llm(tiny_model_dir):
    from pagedserve import LLM
    return LLM(tiny_model_dir, dtype="float32", num_kv_blocks=256)


@pytest.fixture(scope="module")
def tiny_ref(tiny_model_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32).eval()


def test_engine_beam_search_equals_transformers(tiny_llm, tiny_ref):
    from pagedserve.sampling_params import BeamSearchParams
    prompts = [[(7 * i + 3 * n) % 300 + 10 for i in range(n)] for n in (6, 21)]
    for prompt in prompts:
        for k in range(2, 7):
            for early, lp in ((False, 1.0), (True, 0.0), ("never", 2.0)):
                params = BeamSearchParams(beam_width=k, max_tokens=10, length_penalty=lp, early_stopping=early)
                ours = tiny_llm.beam_search([{"prompt_token_ids": prompt}], params)[0].sequences
                ref = hf_beams(tiny_ref, prompt, k, lp, early, 10)
                assert [s.tokens[len(prompt):] for s in ours] == [g for g, _ in ref], (k, early, lp)
                for s, (_, score) in zip(ours, ref):
                    assert abs(s.score - score) < 1e-4
    assert tiny_llm.stats()["kv_blocks_used"] == 0


def test_beams_share_blocks_and_survive_preemption(tiny_model_dir, tiny_llm):
    from pagedserve.engine import LLMEngine
    from pagedserve.sampling_params import BeamSearchParams
    params = BeamSearchParams(beam_width=4, max_tokens=24, early_stopping=True)
    prompts = [[(11 * i + n) % 300 + 10 for i in range(40)] for n in range(6)]
    alone = [tiny_llm.beam_search([{"prompt_token_ids": p}], params)[0].sequences for p in prompts]
    # 6 searches of 4 beams over 64 tokens in a pool of 40 blocks of 16: preemption is certain.
    engine = LLMEngine(model=tiny_model_dir, dtype="float32", num_kv_blocks=40, max_num_batched_tokens=64)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": p}, params)
    results = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            results[out.request_id] = [p + c.token_ids for c, p in zip(out.outputs, [prompts[int(out.request_id)]] * 4)]
        engine.check_invariants()
    assert engine.stats()["num_preemptions"] > 0
    assert [results[str(i)] for i in range(6)] == [[s.tokens for s in a] for a in alone]
    assert engine.stats()["kv_blocks_used"] == 0


def test_beams_share_their_prefix_blocks(tiny_model_dir):
    """4 beams of a 40-token prompt (2.5 blocks) and 24 new tokens: sharing keeps the prompt's blocks once."""
    from pagedserve.engine import LLMEngine
    from pagedserve.sampling_params import BeamSearchParams
    engine = LLMEngine(model=tiny_model_dir, dtype="float32", num_kv_blocks=64, enable_prefix_caching=False)
    engine.add_request("b", {"prompt_token_ids": [(5 * i) % 300 + 10 for i in range(40)]},
                       BeamSearchParams(beam_width=4, max_tokens=24, early_stopping="never"))
    peak = 0
    while engine.has_unfinished_requests():
        engine.step()
        engine.check_invariants()
        peak = max(peak, engine.stats()["kv_blocks_used"])
    unshared = 4 * -(-(40 + 24) // 16)  # each beam with its own copy of every block: 16
    assert peak <= unshared - 3 * 2  # at least the prompt's 2 full blocks are held once, not 4 times


@pytest.mark.slow
def test_default_model_beam_search_equals_transformers():
    """The issue's check: the default model, float32, widths 2-6, against transformers' own load of the GGUF."""
    import os

    from transformers import AutoModelForCausalLM

    from pagedserve import LLM
    from pagedserve.model.loader import default_model_path
    from pagedserve.sampling_params import BeamSearchParams
    path = default_model_path()
    ref = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                               dtype=torch.float32).eval()
    llm = LLM(dtype="float32", max_model_len=512)
    tok = llm.get_tokenizer()
    prompt = tok.apply_chat_template([{"role": "user", "content": "Name three primary colours."}],
                                     add_generation_prompt=True)["input_ids"]
    for k in range(2, 7):
        ours = llm.beam_search([{"prompt_token_ids": prompt}], BeamSearchParams(beam_width=k, max_tokens=16))[0]
        want = hf_beams(ref, prompt, k, 1.0, False, 16)
        assert [s.tokens[len(prompt):] for s in ours.sequences] == [g for g, _ in want], k
        for s, (_, score) in zip(ours.sequences, want):
            assert abs(s.score - score) < 1e-3, k


def test_held_beams_at_max_num_seqs_make_room_for_a_waiting_sibling():
    """Every running request is held for a beam sibling and running is at max_num_seqs: the scheduler must give a
    held request's place to the waiting one, or no step would ever run again."""
    from pagedserve.kv_cache import KVCacheManager
    from pagedserve.request import Request
    from pagedserve.sampling_params import SamplingParams
    from pagedserve.scheduler import Scheduler, SchedulerConfig
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64, max_model_len=64),
                      KVCacheManager(num_blocks=8, block_size=4))
    beams = [Request(f"b{i}", list(range(7)), SamplingParams(max_tokens=4)) for i in range(3)]
    for r in beams:
        sched.add_request(r)
    assert [s.request_id for s in sched.schedule().sequences] == ["b0", "b1"]
    sched.commit_step()
    for r in beams[:2]:
        r.append_output_token(1)
        r.held = True  # their next-token log-probs wait for b2's
    out = sched.schedule()
    assert [s.request_id for s in out.sequences] == ["b2"]
    assert [r.request_id for r in sched.waiting] == ["b1"] and out.preempted_ids == ["b1"]
