"""The settings, declared once as AuditConfig fields: what derives from them, and what must not move.

The digest and the run key name a run's work directory (``OUT/_work/<run key>``): if they
changed for the same settings and version, existing work directories would no longer resume. The
digest is pinned here to values computed by the code before the settings moved into field
metadata; the run key, which also hashes the package version and partials format (and so changes
by design with each release), to values computed for version 0.1.0, partials format 1.
"""

import argparse
import dataclasses
import pickle
import re

import pytest

import distributed_influence
from distributed_influence.cli import build_parser, config_from_args
from distributed_influence.config import AuditConfig
from distributed_influence.config import fields as cfg_fields
from distributed_influence.config.fields import POSITIVE, setting
from distributed_influence.errors import ConfigError
from distributed_influence.store import workstore
from distributed_influence.store.workstore import run_key

BASE = dict(model="model.keras", train="digits", test="digits:test", out="out")
CONFIGS = {
    "defaults": dict(BASE),
    "not_in_digest": dict(BASE, out="elsewhere", address="auto", workers=3, gpus_per_worker=0.5, overwrite=True,
                          batch_size=64, test_block=7, scoring="dense"),
    "every_field": dict(model="m/cnn.keras", train="s3://b/train.parquet", test="data/test.tfrecord", out="o", k=5,
                        lam=0.01, target="predictions", shards=4, feature_layer="flatten", logit_layer="logits",
                        grad_tol=1e-8, max_iter=50, input_shape=(28, 28, 1), scale=0.5, resize=True,
                        image_feature="img", label_feature="lab", id_feature="key"),
    "lam_k": dict(BASE, k=3, lam=0.1),
}
# Computed by the version before the settings moved (commit 2e98789, distributed_influence/config.py,
# loaded from `git show` in a scratch script): existing work directories resume only if these hold.
DIGESTS = {
    "defaults": "494113c87bf8b1a3",
    "not_in_digest": "494113c87bf8b1a3",  # only settings left out of the digest differ from the defaults
    "every_field": "1a51cd3f588f9621",
    "lam_k": "573808155ded0e82",
}
# The run key of version 0.1.0, partials format 1 (the first to hash them; before, 2e98789's run_key
# gave 6935bec610dccd61344e and 94ec8fe4090f365e71eb). The sources are not files (`digits`, a
# missing path), so their fingerprint is the spec itself, the same everywhere.
RUN_KEY_FORMAT = {"version": "0.1.0", "partials_format": 1}
RUN_KEYS = {
    "defaults_3_shards": ("defaults", b"model bytes", "digits", "digits:test", [(0, 20), (20, 40), (40, 60)],
                          "53a28a7a64de4b819e7c"),
    "every_field_1_shard": ("every_field", b"\x00\x01keras", "/nonexistent/train.npz", "digits:test", [(0, 1797)],
                            "f93f329074c9516bc136"),
}
# The same version's AuditConfig(**CONFIGS["every_field"]).to_dict(): the manifest's `config` section.
EVERY_FIELD_DICT = {
    "model": "m/cnn.keras", "train": "s3://b/train.parquet", "test": "data/test.tfrecord", "out": "o", "k": 5,
    "lam": 0.01, "target": "predictions", "shards": 4, "address": None, "feature_layer": "flatten",
    "logit_layer": "logits", "batch_size": None, "test_block": 1024, "gpus_per_worker": None, "workers": None,
    "grad_tol": 1e-08, "max_iter": 50, "input_shape": [28, 28, 1], "scale": 0.5, "overwrite": False, "resize": True,
    "image_feature": "img", "label_feature": "lab", "id_feature": "key", "scoring": "pruned",
}
NOT_IN_DIGEST = {"out", "address", "workers", "gpus_per_worker", "overwrite", "batch_size", "test_block", "scoring"}


@pytest.mark.parametrize("name", sorted(DIGESTS))
def test_digest_equals_the_one_before_the_settings_moved(name):
    assert AuditConfig(**CONFIGS[name]).digest() == DIGESTS[name]


@pytest.mark.parametrize("name", sorted(RUN_KEYS))
def test_run_key_of_the_same_version_and_format_does_not_move(name, monkeypatch):
    """What the key hashes of the inputs is pinned; the version and format are set to those of the
    pin, so that a release (which changes the key by design) does not need a new pin."""
    monkeypatch.setattr(distributed_influence, "__version__", RUN_KEY_FORMAT["version"])
    monkeypatch.setattr(workstore, "PARTIALS_FORMAT", RUN_KEY_FORMAT["partials_format"])
    config, model_bytes, train, test, bounds, expected = RUN_KEYS[name]
    assert run_key(AuditConfig(**CONFIGS[config]).digest(), model_bytes, train, test, bounds) == expected


def test_manifest_config_section_keeps_its_keys_and_values():
    """Every key the section had keeps its value; a setting added since may add a key."""
    for config in (CONFIGS["every_field"], dict(CONFIGS["every_field"], input_shape=[28, 28, 1])):
        section = AuditConfig(**config).to_dict()
        assert {key: section[key] for key in EVERY_FIELD_DICT} == EVERY_FIELD_DICT
        assert set(section) == {f.name for f in dataclasses.fields(AuditConfig)}


def test_digest_leaves_out_exactly_the_settings_that_do_not_change_the_numbers():
    # The settings of the version before stay on their side of the line; a setting added since
    # is on the side its field says.
    assert NOT_IN_DIGEST <= set(cfg_fields.names(AuditConfig, digest=False))
    assert set(EVERY_FIELD_DICT) - NOT_IN_DIGEST <= set(cfg_fields.names(AuditConfig, digest=True))
    changed = {"out": "x", "address": "auto", "workers": 2, "gpus_per_worker": 1.0, "overwrite": True,
               "batch_size": 8, "test_block": 3, "scoring": "dense"}
    for name, value in changed.items():
        assert AuditConfig(**dict(BASE, **{name: value})).digest() == DIGESTS["defaults"], name
    for name, value in {"k": 11, "lam": 0.004, "shards": 2, "resize": True, "model": "other.keras"}.items():
        assert AuditConfig(**dict(BASE, **{name: value})).digest() != DIGESTS["defaults"], name


def _audit_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices["audit"]


def _squeeze(text: str) -> str:
    return re.sub(r"\s+", "", text)


def test_every_field_is_an_audit_flag_with_its_help_default_and_choices():
    """Adding a setting is one field: its flag, help, default and choices appear with no other edit."""
    parser = _audit_parser()
    actions = {a.dest: a for a in parser._actions}
    help_text = _squeeze(parser.format_help())
    for f in dataclasses.fields(AuditConfig):
        action = actions.pop(f.name)
        assert action.option_strings == ["--" + f.name.replace("_", "-")]
        assert action.help % {} == f.metadata["help"], f.name  # what --help prints for the flag
        assert _squeeze(f.metadata["help"]) in help_text, f.name
        if f.default is dataclasses.MISSING:
            assert action.required, f.name
        else:
            assert action.default == f.default and not action.required, f.name
        expected_choices = None if f.metadata["choices"] is None else list(f.metadata["choices"])
        assert action.choices == expected_choices, f.name
        if isinstance(f.default, bool):
            assert isinstance(action, argparse._StoreTrueAction), f.name
    assert set(actions) == {"help", "in_process"}  # the command's own flags, not settings


def test_flags_parse_into_the_config_with_its_defaults():
    parser = _audit_parser()
    args = parser.parse_args(["--model", "model.keras", "--train", "digits", "--test", "digits:test", "--out", "out"])
    assert config_from_args(args) == AuditConfig(**BASE)
    args = parser.parse_args(["--model", "m/cnn.keras", "--train", "s3://b/train.parquet", "--test",
                              "data/test.tfrecord", "--out", "o", "--k", "5", "--lam", "0.01", "--target",
                              "predictions", "--shards", "4", "--feature-layer", "flatten", "--logit-layer",
                              "logits", "--grad-tol", "1e-8", "--max-iter", "50", "--input-shape", "28x28x1",
                              "--scale", "0.5", "--resize", "--image-feature", "img", "--label-feature", "lab",
                              "--id-feature", "key"])
    config = config_from_args(args)
    assert config == AuditConfig(**CONFIGS["every_field"])
    assert config.digest() == DIGESTS["every_field"]


BAD = [  # one value per check, with the message the command printed before the settings moved
    ("k", 0, "--k must be an integer >= 1, got 0"),
    ("k", 2.5, "--k must be an integer >= 1, got 2.5"),
    ("lam", 0, "--lam must be a finite number > 0, got 0"),
    ("lam", float("inf"), "--lam must be a finite number > 0, got inf"),
    ("lam", float("nan"), "--lam must be a finite number > 0, got nan"),
    ("target", "logits", "--target must be one of labels, predictions, got 'logits'"),
    ("shards", 0, "--shards must be an integer >= 1, got 0"),
    ("workers", 0, "--workers must be an integer >= 1, got 0"),
    ("batch_size", 0, "--batch-size must be an integer >= 1, got 0"),
    ("test_block", 0, "--test-block must be an integer >= 1, got 0"),
    ("gpus_per_worker", -0.5, "--gpus-per-worker must be >= 0, got -0.5"),
    ("grad_tol", 0.0, "--grad-tol must be > 0, got 0.0"),
    ("max_iter", 0, "--max-iter must be an integer >= 1, got 0"),
    ("scoring", "fast", "--scoring must be one of pruned, dense, got 'fast'"),
    ("scale", 0.0, "--scale must be > 0, got 0.0"),
    ("input_shape", (), "--input-shape must be positive integers, got ()"),
    ("input_shape", [28, 0], "--input-shape must be positive integers, got [28, 0]"),
    ("resize", "yes", "--resize must be true or false, got 'yes'"),
    ("image_feature", "", "--image-feature must be a non-empty feature name, got ''"),
    ("label_feature", "  ", "--label-feature must be a non-empty feature name, got '  '"),
    ("id_feature", 3, "--id-feature must be a non-empty feature name, got 3"),
]


@pytest.mark.parametrize("name,value,message", BAD, ids=[f"{n}={v!r}" for n, v, _ in BAD])
def test_each_check_refuses_with_one_line_naming_the_flag(name, value, message):
    with pytest.raises(ConfigError) as err:
        AuditConfig(**BASE, **{name: value})
    assert str(err.value) == message


def test_none_means_derive_it_for_optional_settings_only():
    AuditConfig(**BASE, shards=None, workers=None, batch_size=None, gpus_per_worker=None, scale=None,
                input_shape=None, image_feature=None)
    with pytest.raises(ConfigError, match="--test-block must be an integer >= 1, got None"):
        AuditConfig(**BASE, test_block=None)


def test_a_value_of_the_wrong_type_is_a_config_error_not_a_crash():
    with pytest.raises(ConfigError, match=r"--lam must be a finite number > 0, got '0.1'"):
        AuditConfig(**BASE, lam="0.1")


def test_the_docstring_documents_every_field_from_its_help():
    doc = _squeeze(AuditConfig.__doc__)
    for f in dataclasses.fields(AuditConfig):
        assert _squeeze(f"{f.name}: {f.metadata['help']}") in doc, f.name


def test_worker_settings_are_the_fields_marked_for_workers_and_pickle():
    from distributed_influence.engine.plan import WorkerConfig, WorkerSettings

    marked = cfg_fields.names(AuditConfig, worker=True)
    assert tuple(f.name for f in dataclasses.fields(WorkerConfig)) == marked
    config = AuditConfig(**CONFIGS["every_field"])
    settings = WorkerSettings.from_config(config, model_name="cnn.keras", n_train=60, train="/abs/train")
    for name in marked:
        assert getattr(settings, name) == ("/abs/train" if name == "train" else getattr(config, name)), name
    assert settings.input_shape == (28, 28, 1) and settings.model_name == "cnn.keras" and settings.n_train == 60
    assert pickle.loads(pickle.dumps(settings)) == settings  # Ray ships it to the workers


def test_source_options_are_the_fields_marked_as_such():
    from distributed_influence.data.sources import OPTION_NAMES, options_from

    assert OPTION_NAMES == ("scale", "resize", "image_feature", "label_feature", "id_feature", "compression")
    assert options_from(AuditConfig(**CONFIGS["every_field"])) == {
        "scale": 0.5, "resize": True, "image_feature": "img", "label_feature": "lab", "id_feature": "key"}
    assert options_from(EVERY_FIELD_DICT) == options_from(AuditConfig(**CONFIGS["every_field"]))


def test_a_new_setting_is_one_field():
    """A setting added as one field gets its flag, parsing, check, docs, digest entry and worker field."""

    @cfg_fields.documented
    @dataclasses.dataclass(frozen=True)
    class Extended(AuditConfig):
        momentum: float = setting(0.9, check=POSITIVE, worker=True, help="momentum of the fit (default 0.9)")

    parser = argparse.ArgumentParser()
    cfg_fields.add_arguments(parser, Extended)
    args = parser.parse_args(["--model", "m", "--train", "digits", "--test", "digits:test", "--out", "o",
                              "--momentum", "0.5"])
    config = cfg_fields.from_args(Extended, args)
    assert config.momentum == 0.5 and "--momentum" in parser.format_help()
    assert "momentum: momentum of the fit (default 0.9)" in Extended.__doc__
    assert "momentum" in cfg_fields.names(Extended, digest=True) and config.digest() != DIGESTS["defaults"]
    worker = cfg_fields.subset(Extended, "ExtendedWorker", __name__, "test", worker=True)
    assert cfg_fields.values(config, worker)["momentum"] == 0.5
    with pytest.raises(ConfigError, match="--momentum must be > 0, got -1"):
        Extended(**BASE, momentum=-1)


def test_explain_shares_the_audit_flags_and_checks():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    explain = {a.dest: a for a in sub.choices["explain"]._actions}
    audit = {a.dest: a for a in _audit_parser()._actions}
    for name in ("batch_size", "test_block", "scoring"):
        for attr in ("option_strings", "type", "default", "choices", "help"):
            assert getattr(explain[name], attr) == getattr(audit[name], attr), (name, attr)
    assert explain["k"].type is int and explain["k"].default is None  # the audit's k
