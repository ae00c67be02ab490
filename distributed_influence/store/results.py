"""Reading an audit's results back, for notebooks and scripts."""

from __future__ import annotations

import dataclasses
from typing import Optional

from distributed_influence.errors import InputError
from distributed_influence.store import storage, tables


@dataclasses.dataclass
class Results:
    """The tables of one audit (pyarrow), and its manifest.

    ``train_scores`` is None for the output of ``explain``, which has no training side.
    """

    influence_topk: object
    train_scores: Optional[object]
    test_scores: object
    manifest: dict

    def to_pandas(self) -> dict:
        """The tables as pandas DataFrames (pandas must be installed)."""
        return {name: t.to_pandas() for name, t in
                (("influence_topk", self.influence_topk), ("train_scores", self.train_scores),
                 ("test_scores", self.test_scores)) if t is not None}


def load_results(out: str) -> Results:
    """Loads the tables and manifest an audit (or explain) wrote to ``out`` (path or URI).

    Each table is read from its dataset of part files (``OUT/NAME/part-*.parquet``), or from
    the single file ``OUT/NAME.parquet`` of outputs written before the scale-out.

    Raises:
        InputError: ``out`` holds no finished results.
    """
    manifest_spec = storage.join(out, tables.MANIFEST)
    if not storage.exists(manifest_spec):
        raise InputError(f"{manifest_spec}: not found (is {out} the --out of a finished audit?)")
    manifest = tables.read_manifest(out)

    def read(name: str, required: bool = True):
        try:
            table = tables.read_table(out, name, manifest)
        except (OSError, ValueError) as exc:  # a part missing or unreadable
            raise InputError(f"{storage.join(out, name)}: unreadable table ({storage.reason(exc)})") from None
        if table is None and required:
            raise InputError(f"{storage.join(out, name)}: not found (is {out} the --out of a finished audit?)")
        return table

    return Results(read(tables.INFLUENCE_TOPK), read(tables.TRAIN_SCORES, required=False),
                   read(tables.TEST_SCORES), manifest)
