"""torch.profiler over a window of engine steps: where a step's time goes, op by op.

`bench throughput --profile-steps START:COUNT --profile-out FILE` profiles steps
[START, START + COUNT) of the (first) engine run and writes torch's op table, sorted by
self CPU time, to FILE. The run's own timings then include profiler overhead: use a
separate run for numbers you report.
"""
from __future__ import annotations

import torch


def parse_window(text: str) -> tuple[int, int]:
    """'START:COUNT' -> (start, count)."""
    try:
        start, count = (int(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"--profile-steps takes START:COUNT, e.g. 300:5, got {text!r}") from None
    if start < 0 or count < 1:
        raise ValueError(f"--profile-steps needs START >= 0 and COUNT >= 1, got {text!r}")
    return start, count


class StepProfiler:
    def __init__(self, start: int, count: int, out_path: str, row_limit: int = 40) -> None:
        self.start, self.count, self.out_path, self.row_limit = start, count, out_path, row_limit
        self._prof = None
        self.steps_profiled = 0
        self.notes: list[str] = []  # one line per profiled step (batch size)

    def before_step(self, step: int) -> None:
        if step == self.start:
            self._prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self._prof.__enter__()

    def after_step(self, step: int, note: str = "") -> None:
        if self._prof is None:
            return
        self.steps_profiled += 1
        self.notes.append(f"step {step}: {note}")
        if self.steps_profiled == self.count:
            self.close()

    def close(self) -> None:
        """Stop (also when the run ends inside the window) and write the table."""
        if self._prof is None:
            return
        self._prof.__exit__(None, None, None)
        table = self._prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=self.row_limit)
        with open(self.out_path, "w") as f:
            f.write(f"torch.profiler, {self.steps_profiled} engine steps from step {self.start}\n")
            f.write("\n".join(self.notes) + "\n\n" + table + "\n")
        self._prof = None
