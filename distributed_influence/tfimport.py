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


def import_tensorflow():
    """Imports TensorFlow once, with file descriptor 2 pointed at /dev/null meanwhile."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        import tensorflow

        return tensorflow
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (embedded interpreters): import as is
        import tensorflow

        return tensorflow
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        import tensorflow
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    return tensorflow


def import_keras():
    """Keras, imported after a quiet TensorFlow import."""
    import_tensorflow()
    import keras

    return keras
