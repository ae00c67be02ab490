"""Training-data influence for Keras classifiers by Representer Point Selection, on Ray.

Entry points: the ``distributed-influence`` command (:mod:`distributed_influence.cli`) and
:func:`run_audit` for programs, :func:`load_results` to read results back.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "AuditConfig", "run_audit", "load_results"]


def __getattr__(name):
    # Lazy: importing TensorFlow and Ray takes seconds; `--help` and errors should not wait.
    if name == "AuditConfig":
        from distributed_influence.config import AuditConfig

        return AuditConfig
    if name == "run_audit":
        from distributed_influence.engine.job import run_audit

        return run_audit
    if name == "load_results":
        from distributed_influence.store.results import load_results

        return load_results
    raise AttributeError(name)
