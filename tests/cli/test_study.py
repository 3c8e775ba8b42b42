"""CLI contract for studies: the last stdout line is the winning bundle; show, list, export; clear errors."""

import csv
import io
import json

from typer.testing import CliRunner

from handlens.cli.app import app
from handlens.cli.study import parse_budget

runner = CliRunner()
SPACE = {"space": {"train.lr": [0.03, 0.01]},
         "fixed": {"model.backbone": "tiny_cnn", "model.weights": "none", "model.freeze": "frozen",
                   "model.head": "linear", "train.epochs": 3, "train.batch_size": 8}}


def cli(ws, *args):
    return runner.invoke(app, ["--workspace", str(ws.root), *args])


def test_study_run_show_list_export(trained_workspace, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(json.dumps(SPACE))
    ran = cli(trained_workspace, "study", "run", "--dataset", "colours", "--space", str(space), "--sampler", "grid",
              "--cv", "3", "--tracking", "none", "--name", "cli")
    assert ran.exit_code == 0, ran.output
    lines = ran.stdout.strip().splitlines()
    assert lines[-1].endswith("/bundle") and any(line.startswith("verdict:") for line in lines)
    shown = cli(trained_workspace, "study", "show", "cli", "--top", "1")
    assert shown.exit_code == 0 and "the best 1 of 2 trials" in shown.stdout
    misspelt = cli(trained_workspace, "study", "show", "clu")
    assert misspelt.exit_code != 0 and "no study 'clu' (did you mean 'cli'?)" in misspelt.output
    listed = json.loads(cli(trained_workspace, "study", "list", "--json").stdout)
    assert [s["name"] for s in listed] == ["cli"] and listed[0]["trials"] == {"complete": 2}
    assert (listed[0]["cv"], listed[0]["ensemble"], listed[0]["copies"]) == (3, 1, 0)
    assert "3-fold" in cli(trained_workspace, "study", "list").stdout
    rows = list(csv.DictReader(io.StringIO(cli(trained_workspace, "study", "export", "cli", "--csv").stdout)))
    assert [r["train.lr"] for r in rows] == ["0.03", "0.01"] and all(r["cv_mean"] for r in rows)
    again = cli(trained_workspace, "study", "run", "--dataset", "colours", "--space", str(space), "--name", "cli")
    assert again.exit_code != 0 and "--resume cli" in again.output
    # on --resume a given option that differs from the study's is refused, its default value too
    for flag, value in (("--cv", "5"), ("--sampler", "tpe")):
        changed = cli(trained_workspace, "study", "run", "--resume", "cli", flag, value)
        assert changed.exit_code != 0 and f"made with its own {flag}" in changed.output, changed.output
    same = cli(trained_workspace, "study", "run", "--resume", "cli", "--cv", "3", "--tracking", "none")
    assert same.exit_code == 0 and same.stdout.strip().splitlines()[-1].endswith("/bundle"), same.output
    typo = tmp_path / "typo.yaml"
    typo.write_text(json.dumps({"space": {"train.lrr": [0.1]}}))
    bad = cli(trained_workspace, "study", "run", "--dataset", "colours", "--space", str(typo))
    assert bad.exit_code != 0 and "did you mean train.lr" in bad.output


def test_an_errors_bracketed_example_is_printed_as_written(trained_workspace, tmp_path):
    """Error messages carry examples in brackets ({float: [low, high]}): printed as written, not eaten as rich
    markup (the fix the message gives was lost)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("space:\n  train.lr: {float: [1.0e-3, 1.0e-2], lgo: true}\n")
    ran = cli(trained_workspace, "study", "run", "--dataset", "colours", "--space", str(bad))
    assert ran.exit_code != 0 and "write [choices], {float: [low, high], log: true}" in ran.output, ran.output
    assert "unknown field(s) lgo" in ran.output


def test_budget_words():
    assert parse_budget("20m") == 1200 and parse_budget("1h30m") == 5400 and parse_budget("90s") == 90
    assert parse_budget("600") == 600
    import pytest

    from handlens.core.errors import InputError

    with pytest.raises(InputError, match="wall time like 20m"):
        parse_budget("twenty minutes")


def test_the_refit_line_says_what_the_folds_chose():
    from handlens.cli.study import _refit_line

    line = _refit_line({"trial": 3, "run_id": "r1", "epochs": 1, "chosen_on_folds": {"model.logistic_c": 0.01}})
    assert line == ("trial 3 retrained on all train+val images for 1 epoch, model.logistic_c=0.01 (chosen on the "
                    "folds) (run r1)")
    assert _refit_line({"trial": 0, "run_id": "r2", "epochs": 25}).endswith("for 25 epochs (run r2)")
