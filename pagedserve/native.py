"""Our C kernels: each is one C file, compiled at first use with the system C compiler into a cache
folder (no torch headers, no ninja: about a second) and loaded with ctypes, which releases the GIL
during a call. They are built with OpenMP against the libgomp torch has already loaded, so their
threads are torch's own team.

Environment (build time only, never read on the hot path):
  CC              the C compiler command (default `cc`)
  XDG_CACHE_HOME  cache root (default ~/.cache); builds go to pagedserve/kernels/ in it
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import subprocess
import tempfile
from pathlib import Path

# No -ffast-math: it would let the compiler reorder float sums and break the kernels' accuracy bounds.
CFLAGS = ["-O3", "-march=native", "-std=gnu11", "-shared", "-fPIC", "-fopenmp"]


class _OneThread:
    """When kernels must run on one thread: in a forked child (libgomp's thread team does not survive
    fork(): a child entering a parallel region after its parent did waits forever for threads that do not
    exist), or when a kernel did not get torch's own OpenMP runtime (two runtimes fight over the cores)."""
    forced = False


os.register_at_fork(after_in_child=lambda: setattr(_OneThread, "forced", True))


def force_one_thread() -> None:
    _OneThread.forced = True


def thread_count(requested: int | None = None) -> int:
    """The threads a kernel call may use: `requested` (default: torch's thread count), or 1 where a team
    cannot be trusted (see _OneThread)."""
    if _OneThread.forced:
        return 1
    if requested:
        return requested
    import torch  # the build helpers above need no torch; a kernel call has it loaded already
    return torch.get_num_threads()


def openmp_runtimes() -> set[str]:
    """The OpenMP runtime files mapped into this process (Linux; empty elsewhere)."""
    try:
        with open("/proc/self/maps") as f:
            return {line.split()[-1] for line in f if "libgomp" in line or "libiomp" in line or "libomp" in line}
    except OSError:
        return set()


def compiler() -> list[str]:
    return shlex.split(os.environ.get("CC") or "cc")


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "pagedserve" / "kernels"


def _machine_key() -> str:
    """What -march=native depends on: the CPU's feature flags (Linux), else the architecture name."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return platform.machine() + line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def build(source: Path, cc: list[str], out_dir: Path, extra_flags: tuple[str, ...] = ()) -> Path:
    """Compile `source` into out_dir unless already there; returns the .so path. Raises on failure.

    The file name hashes the source, the command and the machine, so each is built once; the
    compiler writes a temporary name that is renamed into place, so a concurrent process never
    loads a half-written file.
    """
    flags = [*CFLAGS, *extra_flags]
    key = hashlib.sha256(b"\0".join([source.read_bytes(), " ".join(cc + flags).encode(), _machine_key().encode()]))
    so = out_dir / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if so.exists():
        return so
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=so.stem + ".", suffix=".tmp", dir=out_dir)
    os.close(fd)
    try:
        res = subprocess.run([*cc, *flags, "-o", tmp, str(source)], capture_output=True, text=True,
                             timeout=120, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"`{' '.join(cc)}` exited with {res.returncode}: {res.stderr.strip()[-2000:]}")
        os.replace(tmp, so)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return so


def try_load(source: Path, log: logging.Logger, unavailable: str, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """load(), or None after one warning `unavailable: why` on `log` when the kernel cannot be built or
    loaded (no compiler, a build error, an unwritable cache): every caller has a slower path to fall back on."""
    try:
        return load(source, extra_flags)
    except Exception as e:  # noqa: BLE001  whatever the compiler or the loader raised, the fallback holds
        log.warning("%s: %s", unavailable, e)
        return None


def load(source: Path, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Build (or find in the cache) and load `source`; a kernel that brought a second OpenMP runtime into
    the process is kept to one thread. Raises when it cannot be built or loaded."""
    lib = ctypes.CDLL(str(build(source, compiler(), cache_dir(), extra_flags)))
    runtimes = openmp_runtimes()
    if len(runtimes) > 1:  # this torch build's libgomp has another name: ours loaded a second runtime
        logging.getLogger(__name__).warning(
            "%s loaded a second OpenMP runtime beside torch's (%s); kernels run on one thread",
            source.name, ", ".join(sorted(runtimes)))
        force_one_thread()
    return lib
