"""Run compile work in a forked child process, off the parent's GIL.

Triton's compiler holds the GIL for most of a compile (measured on the H200, session 9: a helper
thread compiling the sparse kernel slowed Inductor's own compile on the main thread by as much as it
saved), so background compiles that must not slow the caller run in a child made by ``os.fork``:
the child inherits the loaded kernels and their arguments, compiles into Triton's on-disk cache
(``TRITON_CACHE_DIR``, inherited), and leaves with ``os._exit`` without running any of the
parent's exit code. The parent's own compile of the same kernel then finds the binary there.

The work must not touch CUDA state: CUDA cannot be used in a child forked after the parent
initialised it (``torch.cuda`` raises "Cannot re-initialize CUDA in forked subprocess"). A child
that fails ends with status 2; one that hangs (a lock another thread of the parent held at the
fork) is ended by ``SIGALRM`` after ``alarm_s``; the parent can also stop waiting and kill it.
Either way only the background compile is lost: the parent then compiles as it would have without.

Used by ``early_compile`` (the sparse kernel as Inductor will generate it) and ``warmup`` (the
schedule step's JIT kernels). Nothing here is PyTorch-private.
"""

from __future__ import annotations

import os
import signal
import time
import warnings
from typing import Callable, Optional

__all__ = ["available", "start", "wait"]


def available() -> bool:
    """Whether this platform has ``os.fork`` (not Windows)."""
    return hasattr(os, "fork")


def start(work: Callable[[], None], alarm_s: int = 300) -> int:
    """Fork a child that runs ``work()`` and exits: status 0 if it returned, 2 if it raised, killed
    by ``SIGALRM`` after ``alarm_s`` seconds. Returns the child's pid (in the parent)."""
    with warnings.catch_warnings():  # "multi-threaded, fork() may deadlock": the child only compiles,
        warnings.simplefilter("ignore", DeprecationWarning)  # and a hung one is killed (alarm)
        pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            signal.alarm(alarm_s)
            work()
            code = 0
        except BaseException:
            code = 2
        finally:
            os._exit(code)
    return pid


def wait(pid: int, timeout_s: Optional[float] = None) -> Optional[bool]:
    """Collect child ``pid``: True if it exited with status 0, False if it failed or was killed;
    None if it was still running after ``timeout_s`` seconds (it is then killed and collected, so
    that it writes nothing more). ``timeout_s=None`` waits as long as it runs."""
    if timeout_s is None:
        _, status = os.waitpid(pid, 0)
    else:
        end = time.monotonic() + timeout_s
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() >= end:
                try:
                    os.kill(pid, signal.SIGKILL)
                finally:
                    os.waitpid(pid, 0)
                return None
            time.sleep(0.005)  # releases the GIL: the parent's other threads go on meanwhile
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
