"""`distributed-influence report`: the HTML page and its figures, from real audit outputs."""

import argparse
import html.parser
import json
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from distributed_influence import report, tables
from distributed_influence.errors import InputError

from conftest import audit_config

VOID_TAGS = {"meta", "img", "br", "hr", "link", "input"}


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    """A real audit of a tiny CNN on the bundled digits (image sources, known flipped labels)."""
    from distributed_influence.demo import run_demo

    out = str(tmp_path_factory.mktemp("report_demo") / "out")
    run_demo(out, n_train=150, epochs=2, use_ray=False, k=3)
    return out


@pytest.fixture(scope="module")
def flat_out(tmp_path_factory, files):
    """A real audit of a tiny Dense model on flat feature vectors (not images)."""
    from distributed_influence.job import run_audit

    out = str(tmp_path_factory.mktemp("report_flat") / "out")
    run_audit(audit_config(files, out, k=3), use_ray=False)
    return out


def _copy_output(src: str, dst) -> str:
    """The tables and manifest of an audit in a fresh directory, so each test sees only its report."""
    os.makedirs(dst)
    for name in tables.TABLES:
        shutil.copytree(os.path.join(src, name), os.path.join(dst, name))
    shutil.copy(os.path.join(src, tables.MANIFEST), os.path.join(dst, tables.MANIFEST))
    return str(dst)


def _images(page: str) -> list:
    with open(page, encoding="utf-8") as fh:
        return re.findall(r'<img src="([^"]+)"', fh.read())


def _assert_valid_pngs(page: str) -> list:
    """Every figure the page links exists beside it and opens as a PNG with a real size."""
    srcs = _images(page)
    assert srcs
    for src in srcs:
        assert not os.path.isabs(src) and src.endswith(".png"), src
        path = os.path.join(os.path.dirname(page), src)
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 0 and im.size[1] > 0, src
    return srcs


class _TagChecker(html.parser.HTMLParser):
    """Checks that every non-void tag is closed in order."""

    def __init__(self):
        super().__init__()
        self.stack = []

    def handle_starttag(self, tag, attrs):
        if tag not in VOID_TAGS:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1:]}>"
        self.stack.pop()


def _assert_well_formed(page: str) -> str:
    with open(page, encoding="utf-8") as fh:
        text = fh.read()
    checker = _TagChecker()
    checker.feed(text)
    checker.close()
    assert text.startswith("<!DOCTYPE html>") and checker.stack == []
    return text


def test_report_draws_examples_with_images(demo_out, tmp_path):
    out = _copy_output(demo_out, tmp_path / "out")
    page = report.write_report(out)
    assert page == os.path.join(out, "report", "index.html")
    text = _assert_well_formed(page)
    srcs = _assert_valid_pngs(page)
    examples = [s for s in srcs if s.startswith("example_")]
    assert len(examples) == 8
    assert {"audit_curve.png", "alpha_label.png", "decomposition_error.png"} <= set(srcs)
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert f"<td>{manifest['n_train']}</td>" in text and f"<td>{manifest['n_test']}</td>" in text
    assert f"{manifest['head_fit']['max_abs_grad']:.2e}" in text
    assert "representer value</th>" not in text  # pictures, not the fallback table
    states = re.findall(r"<h3>test \d+: .*?\((misclassified|correct)\)</h3>", text)
    assert states == sorted(states, key=lambda s: s != "misclassified")


def test_known_bad_adds_found_curve(demo_out, tmp_path):
    out = _copy_output(demo_out, tmp_path / "out")
    flipped = os.path.join(demo_out, "data", "flipped_ids.txt")
    curve = os.path.join(out, "report", "audit_curve.png")
    report.write_report(out, n_examples=0)
    without = open(curve, "rb").read()
    page = report.write_report(out, known_bad=flipped, n_examples=0)
    text = _assert_well_formed(page)
    assert "audit_curve.png" in _assert_valid_pngs(page)
    assert open(curve, "rb").read() != without  # the known-bad curve and the diagonal were drawn
    n_flipped = len(np.loadtxt(flipped, dtype=np.int64))
    assert f"{n_flipped} in the training set" in text
    assert "5% checked" in text and "20% checked" in text


def test_examples_option_limits_figures(demo_out, tmp_path):
    out = _copy_output(demo_out, tmp_path / "out")
    page = report.write_report(out, n_examples=2)
    assert len([s for s in _assert_valid_pngs(page) if s.startswith("example_")]) == 2


def test_flat_sources_show_ids_and_values(flat_out, tmp_path):
    out = _copy_output(flat_out, tmp_path / "out")
    page = report.write_report(out, n_examples=3)
    text = _assert_well_formed(page)
    srcs = _assert_valid_pngs(page)
    assert not [s for s in srcs if s.startswith("example_")]
    assert "does not hold images" in text
    assert text.count("representer value</th>") == 3
    assert len(re.findall(r"<td>proponent</td>", text)) == 3 * 3


def test_moved_source_falls_back_with_a_note(demo_out, tmp_path):
    out = _copy_output(demo_out, tmp_path / "out")
    path = os.path.join(out, "manifest.json")
    manifest = json.load(open(path))
    manifest["config"]["train"] = str(tmp_path / "<moved>" / "train.npz")
    json.dump(manifest, open(path, "w"))
    page = report.write_report(out, n_examples=2)
    text = _assert_well_formed(page)
    assert "cannot be read" in text and "&lt;moved&gt;" in text and "<moved>" not in text
    assert not [s for s in _assert_valid_pngs(page) if s.startswith("example_")]
    assert text.count("representer value</th>") == 2


def test_missing_out_raises_input_error(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(InputError, match="nowhere"):
        report.write_report(missing)


def test_missing_table_raises_input_error(demo_out, tmp_path):
    out = _copy_output(demo_out, tmp_path / "out")
    shutil.rmtree(os.path.join(out, tables.TEST_SCORES))
    with pytest.raises(InputError, match=tables.TEST_SCORES):
        report.write_report(out)


def test_bad_known_bad_file_raises_input_error(demo_out, tmp_path):
    out = _copy_output(demo_out, tmp_path / "out")
    bad = tmp_path / "bad.txt"
    bad.write_text("3 4\nfive\n")
    with pytest.raises(InputError, match="bad.txt"):
        report.write_report(out, known_bad=str(bad))
    with pytest.raises(InputError, match="absent.txt"):
        report.write_report(out, known_bad=str(tmp_path / "absent.txt"))


def test_parser_and_command(demo_out, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    report.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["report", "somewhere", "--known-bad", "bad.txt", "--examples", "3"])
    assert (args.out, args.known_bad, args.examples, args.func) == ("somewhere", "bad.txt", 3, report.cmd_report)
    out = _copy_output(demo_out, tmp_path / "out")
    args = parser.parse_args(["report", out, "--examples", "1"])
    assert args.known_bad is None
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == os.path.join(out, "report", "index.html")
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for action in sub.choices["report"]._actions:
        assert action.help, action.dest


def test_select_examples_puts_misclassified_first():
    test = {"test_id": np.array([10, 11, 12, 13]), "label": np.array([1, -1, 2, 0]),
            "label_known": np.array([True, False, True, True]), "predicted_class": np.array([1, 0, 0, 0])}
    assert list(report.select_examples(test, 3)) == [2, 0, 1]
    assert list(report.select_examples(test, 0)) == []


def test_audit_curve_counts_known_bad_in_rank_order():
    checked, found = report.audit_curve(np.array([3, 1, 4, 2]), np.array([0, 1, 1, 0]))
    np.testing.assert_allclose(checked, [0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(found, [0, 0.5, 0.5, 0.5, 1])
