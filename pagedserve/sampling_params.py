"""SamplingParams: how one request's tokens are chosen and when it stops (vLLM's names)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

# Stop strings are matched against every new piece of text on the engine thread, where all requests wait on
# it: their number and length are bounded so one request cannot slow its neighbours.
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_LEN = 256


@dataclass(frozen=True)
class StructuredOutputsParams:
    """A grammar every output must follow (vLLM's name and fields); exactly one kind is set.

    json: a JSON schema (dict or its text); regex; choice: the output is one of these strings; grammar: EBNF
    (xgrammar's dialect, GBNF-like); json_object: any JSON object. The engine compiles it with xgrammar
    (structured_output.py) and masks every step's logits to the tokens it allows."""
    json: str | dict | None = None
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    grammar: str | None = None
    json_object: bool = False
    disable_any_whitespace: bool = False  # JSON without free whitespace between tokens

    def __post_init__(self) -> None:
        kinds = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        kinds += ["json_object"] if self.json_object else []
        if len(kinds) != 1:
            raise ValueError(f"structured_outputs must set exactly one of json, regex, choice, grammar and "
                             f"json_object; got {kinds or 'none'}")
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or not all(isinstance(c, str) for c in self.choice)):
                raise ValueError("structured_outputs.choice must be a non-empty list of strings")
            object.__setattr__(self, "choice", tuple(self.choice))
        for k in ("regex", "grammar"):
            if getattr(self, k) is not None and not (isinstance(getattr(self, k), str) and getattr(self, k)):
                raise ValueError(f"structured_outputs.{k} must be a non-empty string")
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise ValueError("structured_outputs.json must be a JSON schema (an object or its text)")

    @property
    def kind(self) -> str:
        return "json_object" if self.json_object else next(
            k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None)

    def key(self) -> tuple:
        """A hashable key naming the grammar (for the compile cache): (kind, spec, disable_any_whitespace), a
        schema given as an object as its JSON text. Key order is kept: a schema's property order is the
        order the output writes them in."""
        spec = getattr(self, self.kind)
        if isinstance(spec, dict):
            spec = json.dumps(spec)
        return self.kind, spec, self.disable_any_whitespace


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the context window
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # top-N log-probabilities per generated token
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Added to the logits of these token ids before sampling (OpenAI's logit_bias), each in [-100, 100].
    logit_bias: dict[int, float] | None = None
    # Top-N log-probabilities of every prompt token after the first (0: only the prompt token's own).
    prompt_logprobs: int | None = None
    structured_outputs: StructuredOutputsParams | None = None
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.top_k == -1:
            self.top_k = 0
        self.stop_strings = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._validate()

    def _validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and math.isfinite(value), f"{name} must be a finite number, got {value!r}")
        need(isinstance(self.n, int) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}")
        need(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        need(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        need(isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be -1, 0 or a positive integer, got {self.top_k!r}")
        need(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        # max_tokens=0 computes the prompt and samples nothing (for its prompt_logprobs).
        need(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 0),
             f"max_tokens must be an integer >= 0, got {self.max_tokens!r}")
        need(isinstance(self.min_tokens, int) and self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens!r}")
        need(self.max_tokens is None or self.min_tokens <= self.max_tokens,
             f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        need(-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        need(-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        need(self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        need(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
             f"logprobs must be an integer in [0, 20], got {self.logprobs!r}")
        need(self.prompt_logprobs is None or (isinstance(self.prompt_logprobs, int) and 0 <= self.prompt_logprobs <= 20),
             f"prompt_logprobs must be an integer in [0, 20], got {self.prompt_logprobs!r}")
        need(self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams),
             "structured_outputs must be a StructuredOutputsParams")
        for token, bias in (self.logit_bias or {}).items():
            need(isinstance(token, int) and not isinstance(token, bool) and token >= 0,
                 f"logit_bias keys must be token ids (integers >= 0), got {token!r}")
            need(isinstance(bias, (int, float)) and math.isfinite(bias) and -100 <= bias <= 100,
                 f"logit_bias values must be numbers in [-100, 100], got {bias!r} for token {token}")
        need(all(isinstance(s, str) and s for s in self.stop_strings), "stop must be a non-empty string or a list of them")
        need(len(self.stop_strings) <= MAX_STOP_STRINGS,
             f"stop holds {len(self.stop_strings)} strings; at most {MAX_STOP_STRINGS} are allowed")
        need(all(len(s) <= MAX_STOP_STRING_LEN for s in self.stop_strings),
             f"stop strings must be at most {MAX_STOP_STRING_LEN} characters long")
        need(all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids),
             f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5


@dataclass
class BeamSearchParams:
    """Beam search (vLLM's names; early_stopping as transformers': True, False or "never"). Greedy over beams:
    the result equals transformers' generate(num_beams=beam_width, do_sample=False) (beam_search.py)."""
    beam_width: int
    max_tokens: int
    length_penalty: float = 1.0
    ignore_eos: bool = False
    early_stopping: bool | str = False

    def __post_init__(self) -> None:
        if not (isinstance(self.beam_width, int) and 1 <= self.beam_width <= 64):
            raise ValueError(f"beam_width must be an integer in [1, 64], got {self.beam_width!r}")
        if not (isinstance(self.max_tokens, int) and self.max_tokens >= 1):
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not (isinstance(self.length_penalty, (int, float)) and math.isfinite(self.length_penalty)):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty!r}")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be true, false or 'never', got {self.early_stopping!r}")

    @property
    def n(self) -> int:
        """The number of sequences returned: every beam's best hypothesis, best first."""
        return self.beam_width
