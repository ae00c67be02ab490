"""Work on one worker: the model loaded once, the rows of its shards featurized and kept.

:class:`ShardWorker` is plain Python. The single-process engine calls it directly; the Ray job
wraps it in an actor (:mod:`distributed_influence.cluster.actor`). Every method takes what it needs
(Θ, test features) as arguments and rebuilds lost state on demand, so a restarted actor that
re-runs a call gives the same answer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from typing import Dict, Optional, Tuple

import numpy as np

from distributed_influence.data.featurize import featurize
from distributed_influence.data.model import Featurizer, load_model, split_model
from distributed_influence.data.sources import open_source
from distributed_influence.engine.plan import ShardSpec, WorkerSettings
from distributed_influence.errors import InputError
from distributed_influence.method import cpu_sums, records, scoring
from distributed_influence.method import logits as logits_mod
from distributed_influence.method import representer as rp
from distributed_influence.store import index

#: Rows per block of the fidelity moments: a block's (rows × C) float64 logits and differences
#: stay a few MB even for a thousand classes.
FIDELITY_ROWS = 2048


@dataclasses.dataclass
class ShardData:
    """A shard's rows after featurization, sorted by id (so ties in top-k go to the smaller id)."""

    x: np.ndarray  # (s, d+1) float32 augmented features
    logits: Optional[np.ndarray]  # (s, C) float32 model logits; dropped once no stage needs them
    labels: np.ndarray  # (s,) int64
    ids: np.ndarray  # (s,) int64
    targets: rp.RowTargets  # t_i of the fit, (s, C) float64 by row block
    x_tf: object = None  # x as a resident tensor on a GPU worker: the fit reads it hundreds of times
    keys: Optional[np.ndarray] = None  # (s,) str: the rows' string keys, when the source has them
    predicted: Optional[np.ndarray] = None  # (s,) int64: the model's class
    label_probability: Optional[np.ndarray] = None  # (s,) float64: the model's probability of the label
    predicted_probability: Optional[np.ndarray] = None  # (s,) float64: ... and of its own class


class ShardWorker:
    """Owns the model and any number of training shards."""

    def __init__(self, model_bytes: bytes, settings: WorkerSettings):
        self.settings = settings
        self._model_bytes = model_bytes
        self._featurizer: Optional[Featurizer] = None
        self._shards: Dict[int, ShardData] = {}
        self._probs: Dict[int, tuple] = {}  # shard → (Θ key, softmax blocks) for Newton's CG
        self._sources = {}

    # ------------------------------------------------------------------ state, rebuilt on demand
    def featurizer(self) -> Featurizer:
        if self._featurizer is None:
            s = self.settings
            model = load_model(self._model_bytes, s.model_name)
            split = split_model(model, s.feature_layer, s.logit_layer, s.model_name)
            self._featurizer = Featurizer(split, s.batch_size)
        return self._featurizer

    def _source(self, which: str):
        if which not in self._sources:
            s = self.settings
            spec = s.train if which == "train" else s.test
            self._sources[which] = open_source(spec, scale=s.scale, layout=(s.layouts or {}).get(which),
                                               **(s.source_options or {}))
        return self._sources[which]

    def _input_shape(self):
        return self.settings.input_shape or self.featurizer().split.input_shape

    def release(self) -> None:
        """Drops every shard (features, logits, the fit's state): the reduce needs none of it,
        and a worker asked for a shard again featurizes it again."""
        self._shards.clear()
        self._probs.clear()

    def describe(self, check: bool) -> dict:
        """The model as the driver needs it, so that the driver never loads TensorFlow.

        Args:
            check: also check both sources against the model (one worker does, for the job):
                a bad input stops the job here, with the same one-line error as on a driver.

        Returns:
            {"split": the split model without its featurizer (``SplitModel.info``), "versions":
            TensorFlow's and Keras's}.
        """
        from distributed_influence.data.inputs import check_sources
        from distributed_influence.tfimport import versions

        split = self.featurizer().split
        if check:
            check_sources(split, self._source("train"), self._source("test"), self.settings.input_shape)
        return {"split": split.info(), "versions": versions()}

    def featurize_rows(self, which: str, start: int, stop: int):
        """Reads rows [start, stop) of a source: (augmented features, logits, ids, labels, keys)."""
        return featurize(self._source(which), self.featurizer(), self._input_shape(), start, stop)

    def featurize_test(self, start: int, stop: int):
        """Test rows [start, stop): ({x: augmented features, logits: the model's}, {pred, ids, labels}).

        Two return values, so that under Ray the part (features and logits, rows × (d+1+C))
        can stay in the object store: the driver passes it on to the scoring calls without ever
        holding it, and keeps only per-row integers (the explained class, ids, labels).
        """
        x, logits, ids, labels, keys = self.featurize_rows("test", start, stop)
        meta = {"pred": logits_mod.predicted_classes(logits), "ids": ids, "labels": labels}
        if keys is not None:
            meta["keys"] = keys
        return {"x": x, "logits": logits}, meta

    def prepare(self, spec: ShardSpec) -> dict:
        """Featurizes a training shard and keeps it; returns its size and where it ran.

        For a source whose keys only the workers see (TFRecord id features: the driver reads no
        record), also the shard's ``ids`` and ``keys``: a key repeated within a shard or across
        two can only be found where they all meet, on the driver (see ``job._featurize``).
        """
        t0 = time.perf_counter()
        data = self._data(spec)
        result = {"shard": spec.index, "rows": len(data.ids), "seconds": time.perf_counter() - t0,
                  "node": _node_id() or ""}
        if data.keys is not None and not self._source("train").keys_listed():
            result.update(ids=data.ids, keys=data.keys)
        return result

    def _data(self, spec: ShardSpec) -> ShardData:
        """The shard's featurized rows; featurized again if this process lost them (restart)."""
        if spec.index not in self._shards:
            x, logits, ids, labels, keys = self.featurize_rows("train", spec.start, spec.stop)
            if labels is None:
                raise InputError(f"{self.settings.train}: the training source has no labels")
            if len(ids) > 1 and not np.all(ids[1:] > ids[:-1]):  # else already in order: no copy
                order = np.argsort(ids, kind="stable")
                x, logits, ids, labels = x[order], logits[order], ids[order], labels[order]
                keys = None if keys is None else keys[order]
            targets = rp.RowTargets(labels, logits, self.settings.target)
            # On a GPU the fit's passes run in TensorFlow on a resident copy; on a CPU in NumPy
            # (cpu_sums: faster there) on the features themselves, with no second copy.
            x_tf = rp.tf.constant(x) if _has_gpu() else None
            predicted = logits_mod.predicted_classes(logits)
            p_label, p_predicted = rp.label_probabilities(logits, labels, predicted)
            self._shards[spec.index] = ShardData(
                x, logits, labels, ids, targets, x_tf=x_tf, keys=keys, predicted=predicted,
                label_probability=p_label, predicted_probability=p_predicted)
        return self._shards[spec.index]

    @staticmethod
    def _fit_math(d: ShardData):
        """The module computing the fit's sums for a shard, and the features it works on."""
        return (cpu_sums, d.x) if d.x_tf is None else (rp, d.x_tf)

    # ----------------------------------------------------------------------------- head fit
    def objective(self, spec: ShardSpec, theta: np.ndarray, precision: str = "float64") -> Tuple[float, np.ndarray]:
        d = self._data(spec)
        math, x = self._fit_math(d)
        if math is cpu_sums and precision == "float32":
            # Newton's next Hessian products are at this Θ if the fit accepts it: keep softmax(XΘ)
            # (in place of the last one, which is dropped first: one such array at a time).
            self._probs.pop(spec.index, None)
            loss, grad, probs = cpu_sums.objective_sums_and_probs(x, d.targets, theta, precision)
            self._probs[spec.index] = (_probs_key(theta, precision), probs)
            return loss, grad
        return math.objective_sums(x, d.targets if math is cpu_sums else d.targets.dense(), theta, precision)

    def hvp(self, spec: ShardSpec, theta: np.ndarray, v: np.ndarray, precision: str = "float64",
            stride: int = 1) -> np.ndarray:
        """Hessian-vector product sums; softmax(XΘ) is kept while Θ stays (one Newton step), and
        comes from a float32 :meth:`objective` at the same Θ when there was one (CPU workers).
        ``stride`` > 1: over every stride-th row, scaled to all (the fit's sketch)."""
        d = self._data(spec)
        math, x = self._fit_math(d)
        if stride > 1:
            return math.hvp_sums(x, theta, v, precision, stride=stride)
        key = _probs_key(theta, precision)
        cached = self._probs.get(spec.index)
        if cached is None or cached[0] != key:
            cached = (key, math.softmax_blocks(x, theta, precision))
            self._probs[spec.index] = cached
        return math.hvp_sums(x, theta, v, precision, probs=cached[1])

    def summed(self, method: str, specs: list, *args):
        """``method`` on each of this worker's shards, the results added up here.

        For the fit's sums ((d+1)×C each, or (d+1)×C×l for the sketch): when several shards
        share a worker, one sum per worker crosses the network instead of one per shard.
        """
        total = None
        for spec in specs:
            r = getattr(self, method)(spec, *args)
            if total is None:
                total = list(r) if isinstance(r, tuple) else r
            elif isinstance(r, tuple):
                total = [t + v for t, v in zip(total, r)]
            else:
                total = total + r
        return tuple(total) if isinstance(total, list) else total

    def fidelity(self, spec: ShardSpec, theta: np.ndarray) -> np.ndarray:
        self._probs.clear()  # the fit is over: its softmax blocks are not needed any more
        d = self._data(spec)
        if d.logits is None:  # asked again after they were dropped (a re-run call): read them again
            del self._shards[spec.index]
            d = self._data(spec)
        # By row blocks: the surrogate's float64 logits of a whole shard, and the differences
        # the moments take, would be several (s × C) float64 arrays at once.
        moments = np.zeros(7)
        for a, b in rp.row_blocks(len(d.x), FIDELITY_ROWS):
            moments += logits_mod.fidelity_moments(rp.linear_logits(d.x[a:b], theta), d.logits[a:b])
        if self.settings.target == "labels":
            # Nothing after the fit needs the logits (n × C: at C = 100, 0.8 × the features),
            # unless the fit's targets are the model's own predictions. A worker that lost them
            # (a restart) featurizes the shard again and has them back.
            d.logits = None
        return moments

    # ------------------------------------------------------------------------------ scoring
    def score(self, spec: ShardSpec, theta: np.ndarray, test_parts: list, test_pred: np.ndarray,
              test_errors: Optional[np.ndarray] = None) -> dict:
        """α of the shard, then its representer values against all test examples, reduced.

        Test examples are taken ``test_block`` at a time, so the (block × shard) matrix of
        values is the largest thing this call allocates, whatever the size of the test set.

        Args:
            spec: the shard.
            theta: the fitted head.
            test_parts: the test parts, {x: features, logits: the model's} (dicts or object-store
                references to them).
            test_pred: the class explained for each test example.
            test_errors: the predicted class of each test example the model gets wrong, −1 for
                the others (:func:`~distributed_influence.method.logits.error_classes`);
                None without test labels (``error_influence`` is then null).

        Returns:
            dict with the shard's partial top-k (values, ids, α, similarity for each kind),
            its per-train rows, Σ_i x_iᵀα_i, and per test row x_t Σ_i x_iᵀα_i at the explained
            class (and, from shard 0, the surrogate's logits x_t Θ and the model's test logits)
            for the decomposition and the test table.
        """
        s = self.settings
        d = self._data(spec)
        self._probs.clear()  # the fit's softmax blocks: the fit is over once scoring starts
        t0 = time.perf_counter()
        parts = _fetch_parts(test_parts)
        test_x = [p["x"] for p in parts]
        n_classes = max(2, d.targets.shape[1])  # a binary model explains classes 0 and 1
        closed_abs = scoring.nonnegative(d.x, rp.RowParts(test_x))
        errors = None if test_errors is None else rp.class_sums(test_x, test_errors, n_classes)
        alpha, alpha_head, sums = rp.alpha_pass(d.x, theta, d.targets, s.lam, s.n_train,
                                                rp.class_sums(test_x, test_pred, n_classes), abs_sums=closed_abs,
                                                error_sums=errors)
        alpha = logits_mod.per_class(alpha)  # a binary head's α as [−α, α]: classes 0 and 1
        # What needs α in float64 is done first; scoring reads only the float32 αᵀ of its
        # geometry, so the (s × C) float64 α is dropped before it starts.
        if s.index_dir:
            index.write_shard(index.shard_file(s.index_dir, spec.index), d.ids, d.labels, d.x, alpha,
                              keys=d.keys)
        alpha_label = alpha[np.arange(len(d.ids)), d.labels]
        geometry = scoring.Geometry(d.x, alpha)
        del alpha
        scored = scoring.score_shard(d.x, d.ids, geometry, test_x, test_pred, s.k, s.test_block, x_tf=d.x_tf,
                                     sums=sums, method=s.scoring, abs_sums=s.abs_sums)
        del geometry
        result = {
            "shard": spec.index,
            "topk": scored["topk"],
            # For the decomposition, without test features in the reduce: x_t Σ_(i in shard)
            # x_iᵀα_i at each test row's explained class (the reduce adds these over shards),
            # and from one shard x_t Θ (the surrogate's logits; raw, one column if binary).
            "test": {"rep_sum": _explained(test_x, logits_mod.per_class(alpha_head), test_pred),
                     # and the model's logits, so that the reduce reads them from storage and the
                     # driver never holds an (m × C) array.
                     **({"surrogate": _logits(test_x, theta),
                         "model": np.concatenate([p["logits"] for p in parts])} if spec.index == 0 else {})},
            "train": {
                "train_id": d.ids,
                "label": d.labels,
                "alpha_label": alpha_label,
                "influence_sum": scored["influence_sum"],
                # NaN where not computed (signed features without --abs-sums): null in the table.
                "influence_abs_sum": scored.get("influence_abs_sum", np.full(len(d.ids), np.nan)),
                # NaN without test labels (no test row is known to be wrong): null in the table.
                "error_influence": sums.get("error_influence", np.full(len(d.ids), np.nan)),
                "predicted_class": d.predicted,
                "label_probability": d.label_probability,
                "predicted_probability": d.predicted_probability,
            },
            "alpha_head": alpha_head,
            "scoring": {**scored["scoring"],
                        "error_sum": records.ERR_NO_LABELS if errors is None else records.ERR_CLOSED},
            "seconds": time.perf_counter() - t0,
            "node": _node_id() or "",  # a string even outside Ray: stored without pickling
        }
        if d.keys is not None:
            result["train"]["train_key"] = d.keys
        return result

    def score_partial(self, spec: ShardSpec, theta: np.ndarray, test_parts: list, test_pred: np.ndarray,
                      partial_dir: str, test_errors: Optional[np.ndarray] = None) -> dict:
        """:meth:`score`, with the big partials written to the run's work area by this worker.

        The top-k candidates of every test row and the per-train rows go to ``partial_dir``
        (see :func:`distributed_influence.engine.reduce.write_partial`), where the reduce tasks read
        them by range; the driver receives only what it keeps: per-train ids and label α (for
        the global audit rank), Σ_i x_iᵀα_i, and where and how long the shard ran.
        """
        from distributed_influence.engine import reduce as rd

        result = self.score(spec, theta, test_parts, test_pred, test_errors)
        rd.write_partial(partial_dir, spec.index, result)
        small = {"shard": spec.index, "alpha_head": result["alpha_head"], "seconds": result["seconds"],
                 "node": result["node"], "train_id": result["train"]["train_id"],
                 "alpha_label": np.asarray(result["train"]["alpha_label"], np.float32),
                 "scoring": result["scoring"]}
        if "train_key" in result["train"]:
            small["train_key"] = result["train"]["train_key"]
        return small


def _probs_key(theta: np.ndarray, precision: str) -> tuple:
    """What softmax(XΘ) kept for the fit's Hessian products was computed for: Θ as sent, bit for
    bit (the fit sends float32 calls' Θ in float32, so an evaluation and the products at the same
    point agree), and the precision."""
    return hashlib.sha1(np.ascontiguousarray(theta).tobytes()).hexdigest(), precision


def _fetch_parts(parts: list) -> list:
    """The test parts ({x, logits}) as arrays: references into Ray's object store come back as
    zero-copy views of shared memory, and are scored in place, never concatenated."""
    if any(not isinstance(p, dict) for p in parts):
        import ray

        parts = ray.get(list(parts))
    return list(parts)


def _logits(parts: list, theta: np.ndarray) -> np.ndarray:
    return np.concatenate([rp.linear_logits(p, theta) for p in parts])


def _explained(parts: list, head: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """x_t · head[:, j_t] for every test row, in float64: one column per row rather than the
    (m × C) logits of which only that column is kept."""
    out, start = np.empty(len(pred)), 0
    for p in parts:
        for a, b in rp.row_blocks(len(p), rp.CAST_BLOCK):
            cols = head[:, pred[start + a:start + b]]  # (d+1, rows) float64
            out[start + a:start + b] = np.einsum("ij,ji->i", np.asarray(p[a:b], np.float64), cols)
        start += len(p)
    return out


def _has_gpu() -> bool:
    """Whether TensorFlow runs this worker's ops on a GPU (after configure_devices)."""
    return bool(rp.tf.config.list_logical_devices("GPU"))


def _node_id() -> Optional[str]:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray there is no node id to report
        return None
    return None
