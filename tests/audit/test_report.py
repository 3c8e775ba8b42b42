"""The audit on a dataset with a planted border marker and planted copies: it names both, in words."""

import json

from typer.testing import CliRunner

from handlens.audit.html import render
from handlens.audit.report import audit, choose_sample
from handlens.cli.app import app

WORDS = ("faithful", "not better than random", "worse than random")


def test_the_audit_finds_the_planted_mark_and_the_copies(planted_bundle):
    ws, bundle = planted_bundle
    report = audit(bundle, ws, sample=12, worst=4, steps=4)
    assert report.leakage["verdict"].startswith("leaks:"), report.leakage
    assert any(p["kind"] == "exact" for p in report.leakage["pairs"])
    marked = [m for m in report.marks if m["label"] == "marked"]
    assert marked and marked[0]["shortcut"] and marked[0]["where"] == "bottom-right corner", report.marks
    assert marked[0]["in_class"] >= 0.9 and marked[0]["in_others"] <= 0.1
    assert not [m for m in report.marks if m["label"] == "plain"]  # noise alone makes no mark
    assert report.marks_verdict.startswith("shortcut: burned-in mark")
    assert report.maps_on_marks["marked"]["verdict"].startswith(("the maps sit on it", "the maps do not sit on it"))
    # every image is 64x64 PNG RGB: the file-attribute baselines are the majority class
    names = {b["name"]: b for b in report.baselines}
    assert set(names) == {"size only", "mode only", "format only", "majority class"}
    assert names["size only"]["accuracy"] == names["majority class"]["accuracy"]
    assert set(report.per_class) == {"marked", "plain"} and report.per_class["marked"]["border"]["maps"] > 0
    assert report.trust["verdict"] in WORDS and report.sample == 12 and len(report.worst) == 4
    checks = dict(report.verdicts())
    assert set(checks) == {"file-attribute baselines", "train/test copies", "map energy", "burned-in marks",
                           "faithfulness"}


def test_the_html_is_one_self_contained_page(planted_bundle):
    ws, bundle = planted_bundle
    page = render(audit(bundle, ws, sample=6, worst=2, steps=3))
    assert page.startswith("<!doctype html>") and page.count("data:image/png;base64,") == 2
    assert "<script" not in page and "http://" not in page and "https://" not in page  # nothing fetched
    assert "leaks:" in page and "burned-in mark" in page and "class=\"verdict bad\"" in page


def test_the_sample_puts_the_worst_first_and_spreads_over_the_classes():
    import numpy as np

    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.99, 0.01], [0.5, 0.5], [0.3, 0.7]])
    targets = np.array([0, 0, 0, 1, 1, 1])
    chosen, worst = choose_sample(probs, targets, sample=4, worst=2)
    assert worst == [3, 1] and chosen[:2] == [3, 1]
    assert len(chosen) == 4 and len(set(chosen)) == 4
    assert {int(targets[i]) for i in chosen[2:]} == {0, 1}  # one more of each class


def test_the_cli_writes_the_report_and_prints_the_verdicts(planted_bundle, tmp_path):
    ws, bundle = planted_bundle
    out = tmp_path / "report" / "audit.html"
    result = CliRunner().invoke(app, ["--workspace", str(ws.root), "audit", str(bundle), "--out", str(out),
                                      "--sample", "6", "--worst", "2", "--steps", "3"])
    assert result.exit_code == 0, result.output
    assert out.is_file() and "train/test copies: leaks:" in result.stdout
    assert "burned-in marks: shortcut:" in result.stdout
    as_json = CliRunner().invoke(app, ["--workspace", str(ws.root), "audit", str(bundle), "--out", str(out),
                                       "--sample", "4", "--worst", "1", "--steps", "3", "--json"])
    body = json.loads(as_json.stdout)
    assert body["html"] == str(out) and "overlay_png" not in body["worst"][0]
    assert next(v["check"] for v in body["verdicts"]) == "file-attribute baselines"
    bad = CliRunner().invoke(app, ["--workspace", str(ws.root), "audit", str(bundle), "--split", "tset"])
    assert bad.exit_code == 2 and "choose train, val or test" in bad.output
