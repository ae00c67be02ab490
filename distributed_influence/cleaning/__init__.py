"""``distributed-influence apply-review``: from an audit's suspects to corrected training data.

A reviewer's decisions (``decisions.csv``, exported by the review page) or an automatic rule
on an audit's ``train_scores`` (``--auto TOP``) say, per training row, keep, relabel, remove or
unsure. This package checks them against the training source and writes a corrected copy beside
a label map, never touching the source:

* :mod:`.sources`: what the command needs to know of a training source (ids, labels, keys,
  classes), read through the package's source layer, and whether an audit belongs to it;
* :mod:`.decisions`: reading and checking a decisions file, and the automatic decisions;
* :mod:`.copies`: the corrected ``.npz`` / Parquet copy, ``label_map.parquet`` and the summary;
* :mod:`.apply`: the command, its settings and :func:`~.apply.apply_review` for scripts.
"""
