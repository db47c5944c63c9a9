"""What every benchmark result carries (machine, date, command), saving it, and plain-text tables."""
from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
import time


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni"})
    except OSError:
        pass
    return []


_THREAD_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "MKL_NUM_THREADS")


def machine_info() -> dict:
    """The machine a number was measured on; torch is imported lazily so `bench serve` needs none."""
    info = {"cpu": _cpu_model(), "cpu_count": os.cpu_count(), "cpu_flags": _cpu_flags(),
            "platform": platform.platform(), "python": platform.python_version(),
            "loadavg_1min": os.getloadavg()[0],
            # thread settings change CPU timings a lot on shared cores
            "env": {k: os.environ[k] for k in _THREAD_ENV if k in os.environ}}
    if "torch" in sys.modules:
        import torch
        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                    cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    return info


class LoadMonitor:
    """Samples the 1-minute load average during a run: other processes on the shared cores skew timings."""

    def __init__(self, every_s: float = 5.0) -> None:
        self.every_s = every_s
        self.samples = [os.getloadavg()[0]]
        self._last = time.monotonic()

    def poll(self) -> None:
        if time.monotonic() - self._last >= self.every_s:
            self._last = time.monotonic()
            self.samples.append(os.getloadavg()[0])

    def summary(self) -> dict:
        self.samples.append(os.getloadavg()[0])
        return {"loadavg_1min_mean": sum(self.samples) / len(self.samples), "loadavg_1min_max": max(self.samples)}


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def command_line() -> str:
    argv = list(sys.argv)
    if argv and os.path.basename(argv[0]) in ("pagedserve", "__main__.py", "cli.py"):
        argv[0] = "pagedserve"
    return shlex.join(argv)


def result_header(args=None) -> dict:
    """date, machine, the command line and the parsed options."""
    head = {"date": now_iso(), "machine": machine_info(), "command": command_line()}
    if args is not None:
        head["args"] = {k: v for k, v in vars(args).items() if k != "func" and _jsonable(v)}
    return head


def _jsonable(v) -> bool:
    return v is None or isinstance(v, (str, int, float, bool, list, tuple, dict))


def save_result(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=str)
        f.write("\n")


def fmt(v, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def format_table(headers: list[str], rows: list[list]) -> str:
    """A plain, aligned text table (first column left, the rest right)."""
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for j, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
