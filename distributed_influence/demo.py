"""``distributed-influence demo``: the whole story on data that ships with the package.

Trains a small CNN of the seed's shape (Conv-Pool-Conv-Pool-Flatten-Dense) on scikit-learn's
bundled digits with a fixed fraction of training labels flipped, saves it as `.keras`, runs
the real audit through Ray on this machine, and reports how many of the flipped labels the
label audit ranks near the top. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Optional

import numpy as np

from distributed_influence.data.sources import digits_arrays
from distributed_influence.report.summary import flagged_fractions, summary_lines


def flip_labels(y: np.ndarray, fraction: float, n_classes: int, seed: int):
    """Replaces the labels of a seeded random subset by a different class.

    Returns:
        (noisy labels, sorted row numbers of the flipped examples).
    """
    rng = np.random.default_rng(seed)
    n_flip = int(round(fraction * len(y)))
    rows = np.sort(rng.choice(len(y), size=n_flip, replace=False))
    noisy = y.copy()
    noisy[rows] = (y[rows] + rng.integers(1, n_classes, size=n_flip)) % n_classes
    return noisy, rows


def build_cnn(input_shape, n_classes: int, seed: int):
    """The seed's model shape: a functional model with outputs [features, logits, softmax]."""
    from distributed_influence.tfimport import import_keras

    keras = import_keras()

    keras.utils.set_random_seed(seed)
    inp = keras.Input(input_shape, name="image")
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(inp)
    h = keras.layers.MaxPooling2D(2)(h)
    h = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(h)
    h = keras.layers.MaxPooling2D(2)(h)
    feats = keras.layers.Flatten(name="features")(h)  # the head's input: 2×2×32 = 128 features
    logits = keras.layers.Dense(n_classes, name="logits")(feats)
    probs = keras.layers.Activation("softmax", name="softmax")(logits)
    trainable = keras.Model(inp, probs)
    trainable.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"])
    return trainable, keras.Model(inp, [feats, logits, probs], name="seed_cnn")


def run_demo(out: str, n_train: Optional[int] = None, flip_fraction: float = 0.1, epochs: int = 40,
             seed: int = 0, use_ray: bool = True, k: int = 10, shards: Optional[int] = None) -> dict:
    """Builds the demo data and model under ``out/data`` and audits them into ``out``."""
    from distributed_influence.tfimport import import_keras

    keras = import_keras()

    from distributed_influence.config import AuditConfig
    from distributed_influence.engine.job import run_audit

    x_tr, y_tr = digits_arrays("train")
    x_te, y_te = digits_arrays("test")
    if n_train is not None:
        x_tr, y_tr = x_tr[:n_train], y_tr[:n_train]
    n_classes = 10
    noisy, flipped = flip_labels(y_tr, flip_fraction, n_classes, seed)
    data = os.path.join(out, "data")
    os.makedirs(data, exist_ok=True)
    trainable, model = build_cnn(x_tr.shape[1:], n_classes, seed)
    trainable.fit(x_tr, noisy, epochs=epochs, batch_size=64, verbose=0)
    acc = float(np.mean(np.argmax(trainable.predict(x_te, verbose=0), axis=1) == y_te))
    model_path = os.path.join(data, "digits_cnn.keras")
    model.save(model_path)
    np.savez(os.path.join(data, "train.npz"), x=x_tr, y=noisy, id=np.arange(len(x_tr), dtype=np.int64))
    np.savez(os.path.join(data, "test.npz"), x=x_te, y=y_te, id=np.arange(len(x_te), dtype=np.int64))
    np.savetxt(os.path.join(data, "flipped_ids.txt"), flipped, fmt="%d")
    keras.backend.clear_session()

    config = AuditConfig(model=model_path, train=os.path.join(data, "train.npz"),
                         test=os.path.join(data, "test.npz"), out=out, k=k, shards=shards,
                         overwrite=True)  # the demo owns its output directory: rerunning replaces it
    manifest = run_audit(config, use_ray=use_ray)
    from distributed_influence.store.results import load_results

    train = load_results(out).train_scores
    found = flagged_fractions(train.column("audit_rank").to_numpy(), train.column("train_id").to_numpy(), flipped)
    manifest["demo"] = {"test_accuracy": acc, "n_flipped": int(len(flipped)),
                        "flipped_found": {f"top_{int(p * 100)}pct": v for p, v in found.items()}}
    with open(os.path.join(out, "demo.json"), "w") as fh:
        json.dump(manifest["demo"], fh, indent=2)
    return manifest


def cmd_demo(args: argparse.Namespace) -> int:
    m = run_demo(args.out, n_train=args.n_train, flip_fraction=args.flip_fraction, epochs=args.epochs,
                 seed=args.seed, use_ray=not args.in_process)
    d = m["demo"]
    print(f"demo: CNN trained on digits with {d['n_flipped']} of {m['n_train']} training labels "
          f"flipped; test accuracy {d['test_accuracy']:.3f}")
    for line in summary_lines(m):
        print(line)
    found = ", ".join(f"{v:.0%} in the top {k.split('_')[1].replace('pct', '%')}"
                      for k, v in d["flipped_found"].items())
    print(f"label audit: of the flipped labels, {found} of audit_rank")
    known_bad = os.path.join(args.out, "data", "flipped_ids.txt")
    print(f"review them: distributed-influence report {args.out} --known-bad {known_bad}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="train a small CNN on bundled digits with flipped labels and audit it",
                       description="End-to-end demo on scikit-learn's bundled digits: no download needed.")
    p.add_argument("--out", default="demo_out", help="output directory (default demo_out)")
    p.add_argument("--n-train", type=int, default=None, help="use only the first N training examples")
    p.add_argument("--flip-fraction", type=float, default=0.1,
                   help="fraction of training labels flipped (default 0.1)")
    p.add_argument("--epochs", type=int, default=40, help="training epochs of the CNN (default 40)")
    p.add_argument("--seed", type=int, default=0, help="seed of the label flips and the training")
    p.add_argument("--in-process", action="store_true", help="run the audit without Ray")
    p.set_defaults(func=cmd_demo)
