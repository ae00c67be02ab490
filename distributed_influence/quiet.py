"""Keeping native libraries' notices off stderr, where the command line promises one line.

TensorFlow's C++ runtime (at import) and Ray's core worker (at actor creation) write notices
straight to file descriptor 2, below Python's logging, so they cannot be filtered there.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading

#: File descriptor 2 is the whole process's: one redirection at a time (another thread's would
#: save /dev/null as the real stderr and could leave it there).
_LOCK = threading.RLock()


@contextlib.contextmanager
def native_stderr_off():
    """File descriptor 2 pointed at /dev/null meanwhile (nothing done without a real stderr,
    e.g. in an embedded interpreter). Every thread's writes to it are lost meanwhile, so keep
    the block short."""
    with _LOCK:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError):
            yield
            return
        try:
            with open(os.devnull, "w") as null:
                os.dup2(null.fileno(), 2)
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
