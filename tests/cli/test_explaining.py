"""CLI contract of the explanation commands (cli/explaining.py) beyond tests/explain: augment-preview's output
and errors, trust's refusal of an unknown ROI source."""

from typer.testing import CliRunner

from handlens.cli.app import app
from handlens.train.run import train
from tests.conftest import tiny_config

runner = CliRunner()


def cli(ws, *args):
    return runner.invoke(app, ["--workspace", str(ws.root), *args])


def test_augment_preview_says_where_the_grid_is_and_names_an_unknown_policy(trained_workspace, tmp_path):
    out = tmp_path / "grid.png"
    result = cli(trained_workspace, "augment-preview", "colours", "--n", "3", "--size", "32", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert f"3 originals and their 'basic' augmentations: {out.resolve()}" in result.stdout and out.is_file()
    bad = cli(trained_workspace, "augment-preview", "colours", "--policy", "nope", "--out", str(out))
    assert bad.exit_code == 2 and "error: unknown augmentation preset 'nope'; presets:" in bad.output
    assert "run config" not in bad.output  # augment-preview reads no run config


def test_trust_refuses_an_unknown_roi_source(trained_workspace, tmp_path):
    bundle = train(tiny_config(), trained_workspace).bundle
    image = str(sorted((tmp_path / "colours" / "red").iterdir())[0])
    result = cli(trained_workspace, "trust", str(bundle), image, "--roi", "bogus")
    assert result.exit_code == 2 and "--roi 'bogus': choose none, threshold or annotations" in result.output
    assert "Traceback" not in result.output
