"""Per-identity usage anomalies: an identity whose token rate jumps far above its own recent baseline.

Tokens (prompt + completion) are counted per identity in windows of `window_s` seconds. The baseline is an
exponentially weighted mean of the identity's earlier windows (each new window weighs `1 / history`); when a
window's tokens pass `factor` times the baseline (and at least `min_tokens`), one `anomaly` audit record is
written for that identity and window. A new identity has no baseline: its first window sets it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class _Usage:
    window: int            # index of the window being counted
    tokens: int = 0
    baseline: float | None = None
    flagged: bool = False  # this window already has its record


@dataclass
class AnomalyDetector:
    window_s: float = 60.0
    factor: float = 10.0
    min_tokens: int = 1000
    history: int = 10
    clock: Callable[[], float] = time.time
    _usage: dict[str, _Usage] = field(default_factory=dict)

    def observe(self, identity: str, tokens: int) -> dict | None:
        """Count a finished request's tokens; the anomaly's details when this one makes its window anomalous."""
        now = self.clock()
        window = int(now // self.window_s)
        u = self._usage.setdefault(identity, _Usage(window))
        if u.window < window:  # close the window that ended; the empty ones after it pull the baseline down
            u.baseline = u.tokens if u.baseline is None else u.baseline + (u.tokens - u.baseline) / self.history
            u.baseline *= (1 - 1 / self.history) ** (window - u.window - 1)
            u.window, u.tokens, u.flagged = window, 0, False
        u.tokens += tokens
        if u.flagged or u.baseline is None or u.tokens < self.min_tokens or u.tokens <= self.factor * u.baseline:
            return None
        u.flagged = True
        return {"identity": identity, "window_start": window * self.window_s, "window_s": self.window_s,
                "tokens": u.tokens, "baseline_tokens": round(u.baseline, 1), "factor": self.factor}
