"""Benchmark workloads: the JSON-lines files written by shared/bench/workload.py.

Each line is {"id", "prompt_token_ids", "max_tokens", "shared_prefix_len"}: prompts as
token ids with exact output lengths (generated with EOS ignored), so every engine,
ours or a peer, does the same work.
"""
from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkloadItem:
    id: str
    prompt_token_ids: list[int]
    max_tokens: int
    shared_prefix_len: int = 0

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


def item_from_dict(d: dict, line_no: int = 0) -> WorkloadItem:
    """One workload line -> WorkloadItem; a clear ValueError for a malformed one."""
    where = f"workload line {line_no}" if line_no else "workload item"
    try:
        ids = [int(t) for t in d["prompt_token_ids"]]
        max_tokens = int(d["max_tokens"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: needs prompt_token_ids (a list of ints) and max_tokens (an int): {e}") from None
    if not ids or max_tokens < 1:
        raise ValueError(f"{where}: needs a non-empty prompt and max_tokens >= 1")
    return WorkloadItem(str(d.get("id", line_no)), ids, max_tokens, int(d.get("shared_prefix_len", 0)))


def load_workload(path: str, num_requests: int | None = None) -> list[WorkloadItem]:
    """The first num_requests items (all if None) of a workload .jsonl file, in file order."""
    items = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not JSON: {e}") from None
            items.append(item_from_dict(d, line_no))
            if num_requests is not None and len(items) >= num_requests:
                break
    if not items:
        raise ValueError(f"{path}: the workload is empty")
    return items


def workload_summary(items: list[WorkloadItem]) -> dict:
    """Sizes of a workload, for results files."""
    p = [it.prompt_len for it in items]
    o = [it.max_tokens for it in items]
    return {"num_requests": len(items), "prompt_tokens": sum(p), "output_tokens": sum(o),
            "mean_prompt_len": sum(p) / len(p), "mean_output_len": sum(o) / len(o),
            "max_prompt_len": max(p), "max_output_len": max(o),
            "shared_prefix_requests": sum(1 for it in items if it.shared_prefix_len)}
