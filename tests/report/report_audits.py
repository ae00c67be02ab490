"""Audit outputs shared by the report's test modules, each computed once per session.

The fixtures :func:`demo_out` and :func:`flat_out` are imported by the test modules that use
them. A module-scoped fixture imported into several modules runs once per module; the demo audit
takes about ten seconds, so the fixtures call these functions, which keep what they made.
"""

from __future__ import annotations

import os
import shutil

import pytest
from conftest import audit_config

from distributed_influence.store import tables

_MADE = {}


def demo_audit(tmp_path_factory) -> str:
    """A real audit of a tiny CNN on the bundled digits (image sources, known flipped labels)."""
    if "demo" not in _MADE:
        from distributed_influence.demo import run_demo

        out = str(tmp_path_factory.mktemp("report_demo") / "out")
        run_demo(out, n_train=150, epochs=2, use_ray=False, k=3)
        _MADE["demo"] = out
    return _MADE["demo"]


def flat_audit(tmp_path_factory, config) -> str:
    """A real audit of a tiny Dense model on flat feature vectors (not images).

    Args:
        config: ``config(out)`` gives the audit's settings (``conftest.audit_config``).
    """
    if "flat" not in _MADE:
        from distributed_influence.engine.job import run_audit

        out = str(tmp_path_factory.mktemp("report_flat") / "out")
        run_audit(config(out), use_ray=False)
        _MADE["flat"] = out
    return _MADE["flat"]


def copy_output(src: str, dst) -> str:
    """The tables, manifest and train index of an audit in a fresh directory, so each test sees
    only its report (tables may be files or directories of part files)."""
    os.makedirs(dst)
    for name in list(tables.OUTPUT_FILES) + ["index"]:
        path = os.path.join(src, name)
        (shutil.copytree if os.path.isdir(path) else shutil.copy)(path, os.path.join(dst, name))
    return str(dst)


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    """A real audit of a tiny CNN on the bundled digits (image sources, known flipped labels)."""
    return demo_audit(tmp_path_factory)


@pytest.fixture(scope="module")
def flat_out(tmp_path_factory, files):
    """A real audit of a tiny Dense model on flat feature vectors (not images)."""
    return flat_audit(tmp_path_factory, lambda out: audit_config(files, out, k=3))
