"""The cyclic garbage collector and the objects the job's processes keep for life.

Importing Ray, TensorFlow and Keras creates ~300,000 Python objects that live as long as the
process. Python's cyclic collector runs every 700 new objects and, as the heap grows, walks
them again and again: 717 collections and 0.63–0.74 s of a 3.2–3.7 s import of Ray, TensorFlow
and Keras on the 2-core benchmark machine. Merely pausing it does not help: the first
collection after the pause walks them all (0.19 s), then a full one again (0.21 s). Every later
full collection walks them (0.12–0.25 s each: ten of them in the two workers of one Fashion-MNIST
audit, 0.83 s), and so does the interpreter's exit (0.27–0.42 s after a run that used Ray,
0.06 s with them frozen).

So in a process of the job's own (the command, a Ray worker: :func:`own_process`), the blocks
that make such objects run with the collector paused and end by freezing what exists
(:func:`long_lived`): it is never walked again. The collector stays on for everything after. A
frozen object that was garbage already (a reference cycle an import left behind) is never
freed: after importing Ray, TensorFlow and Keras, 491,000 objects were frozen against 315,000
left by a full collection, yet the resident size was the same (556 MB against 554 MB). In any
other process (a notebook, a test session) nothing changes: its heap is not this project's to
freeze.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Iterator

_own = False


def own_process() -> None:
    """Declares this process the job's own, for the rest of its life: the objects its imports
    and set-up make may be frozen. Only the command's entry point and the Ray workers call it."""
    global _own
    _own = True


@contextlib.contextmanager
def long_lived() -> Iterator[None]:
    """Runs a block whose objects live as long as the process.

    In a process of the job's own, the collector is paused meanwhile, and what exists at the end
    (what the block made, and everything before it) is frozen before the collector runs again,
    so that no collection walks it. Elsewhere the block runs as it would without this.

    Yields:
        None, once.
    """
    if not _own:
        yield
        return
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


def freeze() -> None:
    """In a process of the job's own, takes everything tracked now out of all later collections,
    the interpreter's last one at exit included. Elsewhere it does nothing."""
    if _own:
        gc.freeze()
