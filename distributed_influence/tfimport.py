"""Importing TensorFlow without its start-up chatter on stderr.

TensorFlow's C++ runtime prints several lines when it is imported (absl's pre-init warning,
oneDNN and CPU-feature notices) regardless of ``TF_CPP_MIN_LOG_LEVEL``. On a command whose
contract is "bad input gives one clear line on stderr", and in worker logs forwarded to the
driver, those lines drown the message that matters. Set ``TF_CPP_MIN_LOG_LEVEL=0`` to see them
(useful when debugging CUDA library loading on GPU nodes).

Keras also imports, when they are installed, the libraries of integrations this project never
uses (scikit-learn for its estimator wrappers, matplotlib for its image gallery, pandas for
DataFrame inputs to ``fit``); each import is guarded by ``except ImportError`` in Keras. In the
job's Ray workers, processes that only run the job's math, they are kept out of Keras's import
(``lean=True``, see :data:`OPTIONAL`): 4.6 s → 3.4 s of a core for TensorFlow and Keras together
on the 2-core benchmark machine. The libraries stay importable afterwards, but that process's
Keras keeps those integrations off (its scikit-learn wrappers refuse to run), so other processes
(a user's notebook, the in-process engine) import Keras as it is.

pyarrow, likewise, imports pandas at its first conversion (``pa.array``, ``pq.read_table``) to
check whether the data are pandas objects, though the job's data never are: 0.36 s of a core
alone, and 17 % of a shard's scoring in a profile of the Fashion-MNIST audit on the benchmark
machine. :func:`pyarrow_without_pandas` settles that check in the workers without pandas.
"""

from __future__ import annotations

import contextlib
import os
import sys

from .quiet import native_stderr_off

#: Libraries Keras imports only for integrations (``try: import ... except ImportError``).
OPTIONAL = ("sklearn", "matplotlib", "pandas")


@contextlib.contextmanager
def _without_optional():
    """Makes the OPTIONAL libraries not yet imported unimportable meanwhile (a None entry in
    ``sys.modules`` makes ``import`` raise ImportError), then importable again."""
    hidden = [name for name in OPTIONAL if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None
    try:
        yield
    finally:
        for name in hidden:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]


def import_tensorflow(lean: bool = False):
    """Imports TensorFlow once, with file descriptor 2 pointed at /dev/null meanwhile.

    Args:
        lean: keep Keras's optional integrations out of its import (for the job's workers).
    """
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        return _import(lean)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with native_stderr_off():
        return _import(lean)


def _import(lean: bool):
    # TensorFlow's own import loads Keras (for tf.keras), so both are imported here.
    with _without_optional() if lean else contextlib.nullcontext():
        import tensorflow
        import keras  # noqa: F401

    return tensorflow


class _Refuse:
    """An import hook that makes the named top-level packages (and their submodules) unfindable."""

    def __init__(self, names):
        self.names = frozenset(names)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"{fullname} is kept out of this import", name=fullname)
        return None


def pyarrow_without_pandas() -> None:
    """Has pyarrow's conversions in this process go on without importing pandas.

    pyarrow looks for pandas once per process, at its first conversion, and remembers the
    answer for its checks of the data's type; that look happens here with pandas unfindable.
    Asked for explicitly (``Table.to_pandas``, ``from_pandas``), pyarrow imports pandas then, as
    it would have. (A ``None`` entry in ``sys.modules`` does not do here what it does for Keras:
    pyarrow's compiled import takes the ``None`` for the module; an import hook is refused as an
    import should be.) The answer holds for the process's life: should pandas be imported
    later, pyarrow still takes a pandas object handed to ``pa.array`` for a plain sequence.
    So for the job's own processes only, like ``lean``, whose data are NumPy arrays and lists;
    a process that has imported pandas already is left as it is.
    """
    if "pandas" in sys.modules:
        return
    import pyarrow as pa

    hook = _Refuse(["pandas"])
    sys.meta_path.insert(0, hook)
    try:
        pa.array([0])
    finally:
        sys.meta_path.remove(hook)


def import_keras():
    """Keras, imported after a quiet TensorFlow import."""
    import_tensorflow()
    import keras

    return keras


def versions() -> dict:
    """TensorFlow's and Keras's versions (for the manifest), loading them if needed."""
    keras = import_keras()
    return {"tensorflow": sys.modules["tensorflow"].__version__, "keras": keras.__version__}
