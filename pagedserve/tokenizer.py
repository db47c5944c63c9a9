"""Text in and out: loading the HF tokenizer, chat templates, incremental detokenization, stop strings."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from pagedserve.model.loader import load_tokenizer  # noqa: F401  (re-exported: text in and out live here)
from pagedserve.sampling_params import SamplingParams

REPLACEMENT = "\ufffd"  # what a decoder shows for bytes that are not (yet) a whole UTF-8 character


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a text prompt; BOS is added or not as the tokenizer itself does."""
    return list(tokenizer.encode(text))


def apply_chat_template(tokenizer, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
    """Token ids of a conversation rendered with the tokenizer's chat template (kwargs go to the template)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template; send a plain prompt instead")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                        tokenize=True, return_dict=False, **kwargs)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # some versions return an encoding anyway
        ids = ids["input_ids"]
    return list(ids)


class IncrementalDetokenizer:
    """One sequence's output token ids -> text deltas whose concatenation is the full decode.

    Decodes a short window: the text of ids[prefix:read] was already emitted; the text of ids[prefix:] minus
    it is new. Starting the window a few tokens back (into the prompt at first) keeps decoders that treat
    the first token specially (SentencePiece's leading space) consistent. A byte-level BPE token can end
    inside a UTF-8 character: the decoder then shows a trailing U+FFFD that a later token will replace, so
    that character is held back (the text before it still goes out) until it completes, or until flush().
    """

    def __init__(self, tokenizer, prompt_token_ids: Sequence[int] = (), skip_special_tokens: bool = True,
                 context: int = 5):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = list(prompt_token_ids[-context:]) if context > 0 else []
        self._prefix = 0                  # window start
        self._read = len(self.token_ids)  # ids before this are emitted (in full)
        self._held_out = 0                # chars of the text after ids[:read] already emitted
        if self._decode(self.token_ids).endswith(REPLACEMENT):
            self._prefix = self._read     # the prompt ends mid-character: no context
        self.num_context_tokens = self._read

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def step(self, new_token_ids: int | Sequence[int]) -> str:
        """Append generated token(s); returns the text they complete (possibly "")."""
        if isinstance(new_token_ids, int):
            new_token_ids = [new_token_ids]
        self.token_ids.extend(new_token_ids)
        done = len(self._decode(self.token_ids[self._prefix:self._read]))
        text = self._decode(self.token_ids[self._prefix:])
        complete = not text.endswith(REPLACEMENT)
        delta = (text if complete else text[:-1])[done + self._held_out:]
        if complete:
            self._prefix, self._read, self._held_out = self._read, len(self.token_ids), 0
        else:
            self._held_out += len(delta)
        return delta

    def flush(self) -> str:
        """At the end of the sequence: the held-back text, shown as the full decode shows it."""
        done = len(self._decode(self.token_ids[self._prefix:self._read]))
        rest = self._decode(self.token_ids[self._prefix:])[done + self._held_out:]
        self._prefix = self._read = len(self.token_ids)
        self._held_out = 0
        return rest


@dataclass
class StopResult:
    text: str               # text that may be streamed now
    stop_str: str | None    # the stop string found, when generation must stop


class StopChecker:
    """Finds stop strings in streamed text; a stop string may span deltas.

    Text that could be the start of a stop string is withheld until it is known not to be one, so a stop
    string is never partly streamed and then retracted. When several stop strings occur, the one that ends
    first wins (as if text came one character at a time), so the result does not depend on how the text was
    split into deltas. The stop string itself is dropped unless include_stop_str_in_output.
    """

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False):
        self.stop = list(dict.fromkeys(s for s in stop if s))
        self.include = include_stop_str_in_output
        self.max_partial = max((len(s) for s in self.stop), default=1) - 1
        # Every proper prefix of a stop string: a held-back tail is looked up, not compared with each string.
        self._prefixes = {s[:n] for s in self.stop for n in range(1, len(s))}
        self._held = ""
        self.stopped: str | None = None

    def process(self, delta: str) -> StopResult:
        if self.stopped is not None:
            return StopResult("", self.stopped)
        if not self.stop:
            return StopResult(delta, None)
        text = self._held + delta
        found = None  # (end, start, stop string)
        for s in self.stop:
            # The held text holds no whole stop string: only a match that ends in the new delta is possible.
            i = text.find(s, max(0, len(self._held) - len(s) + 1))
            if i >= 0 and (found is None or (i + len(s), i) < found[:2]):
                found = (i + len(s), i, s)
        if found is not None:
            end, start, s = found
            self._held, self.stopped = "", s
            return StopResult(text[:end] if self.include else text[:start], s)
        hold = self._partial_stop_len(text)
        self._held = text[len(text) - hold:] if hold else ""
        return StopResult(text[:len(text) - hold], None)

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest tail of text that is a proper prefix of a stop string."""
        for n in range(min(self.max_partial, len(text)), 0, -1):
            if text[-n:] in self._prefixes:
                return n
        return 0

    def flush(self) -> str:
        """Generation ended for another reason: the withheld text is plain text after all."""
        held, self._held = self._held, ""
        return held if self.stopped is None else ""


@dataclass
class TextDelta:
    text: str
    stop_str: str | None = None  # set when a stop string ended the sequence


class OutputText:
    """A sequence's detokenizer and stop checker together: token ids in, streamable text out."""

    def __init__(self, tokenizer, params: SamplingParams, prompt_token_ids: Sequence[int] = ()):
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids, params.skip_special_tokens)
        self.stop_checker = StopChecker(params.stop_strings, params.include_stop_str_in_output)
        self.text = ""  # everything emitted so far

    def append(self, token_ids: int | Sequence[int]) -> TextDelta:
        r = self.stop_checker.process(self.detokenizer.step(token_ids))
        self.text += r.text
        return TextDelta(r.text, r.stop_str)

    def finish(self) -> str:
        """The sequence ended (length, EOS, stop token, abort): the rest of the text, to emit last."""
        r = self.stop_checker.process(self.detokenizer.flush())
        rest = r.text + self.stop_checker.flush()
        self.text += rest
        return rest
