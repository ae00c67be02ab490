"""Importing TensorFlow without its start-up chatter on stderr.

TensorFlow's C++ runtime prints several lines when it is imported (absl's pre-init warning,
oneDNN and CPU-feature notices) regardless of ``TF_CPP_MIN_LOG_LEVEL``. On a command whose
contract is "bad input gives one clear line on stderr", and in worker logs forwarded to the
driver, those lines drown the message that matters. Set ``TF_CPP_MIN_LOG_LEVEL=0`` to see them
(useful when debugging CUDA library loading on GPU nodes).
"""

from __future__ import annotations

import os
import sys

from distributed_influence.quiet import native_stderr_off


def import_tensorflow():
    """Imports TensorFlow once, with file descriptor 2 pointed at /dev/null meanwhile."""
    if "tensorflow" in sys.modules:  # imported already: nothing to keep quiet
        import tensorflow

        return tensorflow
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        return _import()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with native_stderr_off():
        return _import()


def _import():
    # TensorFlow's own import loads Keras (for tf.keras), so both are imported here.
    # isort: off
    import tensorflow
    import keras  # noqa: F401
    # isort: on

    return tensorflow


def import_keras():
    """Keras, imported after a quiet TensorFlow import."""
    import_tensorflow()
    import keras

    return keras


def versions() -> dict:
    """TensorFlow's and Keras's versions (for the manifest), loading them if needed."""
    tf = import_tensorflow()
    keras = import_keras()
    return {"tensorflow": tf.__version__, "keras": keras.__version__}
