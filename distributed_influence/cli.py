"""The ``distributed-influence`` command.

Exit codes: 0 success, 2 bad input (one line on stderr naming the problem, nothing written),
1 anything unexpected (with a traceback, because that is a bug to report).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

from distributed_influence.config import AuditConfig, fields
from distributed_influence.errors import ClusterError, InputError
from distributed_influence.report.summary import summary_lines


def add_audit_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``audit``: one per :class:`AuditConfig` field, and ``--in-process``.

    The flags are derived from the fields (:func:`distributed_influence.config.fields.add_arguments`),
    so a new setting is declared once, in :mod:`distributed_influence.config.audit`.
    """
    fields.add_arguments(p, AuditConfig)
    # How this command runs the job, not a setting of the result: not an AuditConfig field.
    p.add_argument("--in-process", action="store_true",
                   help="run every shard in this process without Ray (the single-process engine)")


def config_from_args(args: argparse.Namespace) -> AuditConfig:
    """The validated :class:`AuditConfig` of the parsed ``audit`` flags.

    Raises:
        ConfigError: a value breaks its setting's check.
    """
    return fields.from_args(AuditConfig, args)


def cmd_audit(args: argparse.Namespace) -> int:
    from distributed_influence.engine.job import run_audit

    config = config_from_args(args)
    manifest = run_audit(config, use_ray=not args.in_process)
    for line in summary_lines(manifest):
        print(line)
    if config.report:
        from distributed_influence.report.page import write_report

        print(f"report: {write_report(config.out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distributed-influence",
        description="Training-data influence (Representer Point Selection) for Keras classifiers, on Ray.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every stage")
    sub = parser.add_subparsers(dest="command", required=True)
    audit = sub.add_parser("audit", help="compute influence tables for a model, a training and a test set",
                           description="Compute proponents/opponents per test example and a label audit "
                                       "of the training set; writes Parquet tables to --out.")
    add_audit_arguments(audit)
    audit.set_defaults(func=cmd_audit)
    from distributed_influence import demo
    from distributed_influence.cleaning import apply as apply_review
    from distributed_influence.engine import explain
    from distributed_influence.report import page as report

    explain.add_parser(sub)
    report.add_parser(sub)
    demo.add_parser(sub)
    apply_review.add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        return args.func(args)
    except InputError as exc:
        print(f"distributed-influence: error: {exc}", file=sys.stderr)
        return 2
    except ClusterError as exc:
        print(f"distributed-influence: error: {exc}", file=sys.stderr)
        return 1


def run(argv: Optional[List[str]] = None) -> int:
    """The command's entry point (the console script, and ``jobs/audit.py``).

    Returns:
        :func:`main`'s exit code.
    """
    return main(argv)


if __name__ == "__main__":
    sys.exit(run())
