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

from distributed_influence.errors import ClusterError, InputError
from distributed_influence.report.summary import summary_lines


def _shape(text: str) -> tuple:
    try:
        dims = tuple(int(t) for t in text.replace("x", ",").split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not dims:
        raise argparse.ArgumentTypeError("expected at least one dimension")
    return dims


def add_audit_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``audit`` (shared with the Ray Jobs entrypoint)."""
    p.add_argument("--model", required=True, help="trained classifier, a .keras file")
    p.add_argument("--train", required=True,
                   help="training source: .npz (x, y[, id]), .parquet (label, x|image[, id]; image "
                        "may hold PNG/JPEG bytes), TFRecord file(s) (a file, a glob or a comma list), "
                        "an image folder DIR/CLASS/*.png|jpg, an IDX images file, or 'digits'")
    p.add_argument("--test", required=True, help="test source whose predictions are explained (same kinds)")
    p.add_argument("--out", required=True, help="output directory for the Parquet tables and manifest.json")
    p.add_argument("--k", type=int, default=10, help="proponents and opponents kept per test example (default 10)")
    p.add_argument("--lam", type=float, default=0.003, help="L2 strength lambda of the head fit (default 0.003)")
    p.add_argument("--target", choices=["labels", "predictions"], default="labels",
                   help="fit the head to the training labels (default; for label audits) or to the "
                        "model's own softmax outputs (highest fidelity)")
    p.add_argument("--shards", type=int, default=None,
                   help="row-range shards of the training set (default: one per worker)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join ('auto' or host:port; default: $RAY_ADDRESS, else start "
                        "Ray on this machine)")
    p.add_argument("--feature-layer", default=None, help="name of the layer whose output is the feature vector")
    p.add_argument("--logit-layer", default=None, help="name of the Dense layer that produces the logits")
    p.add_argument("--batch-size", type=int, default=None,
                   help="rows per forward pass (default: by input size, 32 to 1024; halved on out-of-memory)")
    p.add_argument("--test-block", type=int, default=1024,
                   help="test examples scored at once per shard; bounds worker memory (default 1024)")
    p.add_argument("--gpus-per-worker", type=float, default=None,
                   help="GPUs per Ray worker (default: 1 if the cluster has GPUs, else 0)")
    p.add_argument("--workers", type=int, default=None,
                   help="Ray workers (default: one per GPU, or per CPU when there are no GPUs)")
    p.add_argument("--grad-tol", type=float, default=1e-10,
                   help="the head fit stops when max |grad J| <= this (default 1e-10)")
    p.add_argument("--max-iter", type=int, default=1000, help="iteration cap of the head fit's L-BFGS fallback and of one Newton step's CG (CG at most 300; default 1000)")
    p.add_argument("--input-shape", type=_shape, default=None,
                   help="shape of one example for flat Parquet rows, e.g. 28,28,1 (default: the model's)")
    p.add_argument("--scale", type=float, default=None,
                   help="factor applied to input values: Parquet 'image' bytes and IDX pixels "
                        "(default 1/255), Parquet 'x' lists (default 1, unchanged)")
    p.add_argument("--resize", action="store_true",
                   help="resize decoded images (PNG/JPEG in Parquet, TFRecord, image folders) to the "
                        "model's input size, bilinear (default: a size mismatch is an error)")
    p.add_argument("--image-feature", default=None,
                   help="TFRecord feature holding the image (default: 'image/encoded', else 'image')")
    p.add_argument("--label-feature", default=None,
                   help="TFRecord feature holding the label (default: 'label', else 'image/class/label')")
    p.add_argument("--id-feature", default=None,
                   help="TFRecord feature holding a string key per record (default: 'id' when present)")
    p.add_argument("--scoring", choices=["pruned", "dense"], default="pruned",
                   help="pruned (default): exact top-k from the few training rows whose bound "
                        "|alpha|*|x_i|*|x_t| can reach it; dense: every (test, train) pair. Same tables")
    p.add_argument("--overwrite", action="store_true",
                   help="replace results or partial results of a different job found in --out")
    p.add_argument("--in-process", action="store_true",
                   help="run every shard in this process without Ray (the single-process engine)")


def config_from_args(args: argparse.Namespace):
    from distributed_influence.config import AuditConfig

    return AuditConfig(
        model=args.model, train=args.train, test=args.test, out=args.out, k=args.k, lam=args.lam,
        target=args.target, shards=args.shards, address=args.address,
        feature_layer=args.feature_layer, logit_layer=args.logit_layer, batch_size=args.batch_size,
        test_block=args.test_block, gpus_per_worker=args.gpus_per_worker, workers=args.workers,
        grad_tol=args.grad_tol, max_iter=args.max_iter, input_shape=args.input_shape, scale=args.scale,
        overwrite=args.overwrite, resize=args.resize, image_feature=args.image_feature,
        label_feature=args.label_feature, id_feature=args.id_feature, scoring=args.scoring,
    )


def cmd_audit(args: argparse.Namespace) -> int:
    from distributed_influence.engine.job import run_audit

    manifest = run_audit(config_from_args(args), use_ray=not args.in_process)
    for line in summary_lines(manifest):
        print(line)
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
    from distributed_influence.engine import explain
    from distributed_influence.report import page as report

    explain.add_parser(sub)
    report.add_parser(sub)
    demo.add_parser(sub)
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
