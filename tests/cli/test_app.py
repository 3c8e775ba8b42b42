"""The assembled app (cli/app.py): global options, the console-script entry point, and a --help that imports
nothing heavy."""

import importlib
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from handlens.cli.app import app

runner = CliRunner()


def test_db_url_option_puts_the_catalog_elsewhere(make_tree, tmp_path):
    root = make_tree({"a": 2})
    other = tmp_path / "team.db"
    result = runner.invoke(app, ["--workspace", str(tmp_path / "ws"), "--db", f"sqlite:///{other}",
                                 "import", str(root), "--dataset", "d"])
    assert result.exit_code == 0, result.output
    assert other.is_file() and not (tmp_path / "ws" / "handlens.db").exists()


@pytest.mark.parametrize("module", ["handlens.cli.app", "handlens.cli.main"])
def test_help_is_fast_to_import_and_does_not_import_torch(module):
    code = (
        "import sys, runpy; sys.argv=['handlens','--help'];\n"
        f"try:\n    runpy.run_module({module!r}, run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "names = ('torch', 'torchvision', 'timm', 'lightning', 'sqlalchemy', 'PIL', 'numpy')\n"
        "heavy = [m for m in names if m in sys.modules]\n"
        "print('HEAVY', heavy)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, check=True)
    assert "HEAVY []" in result.stdout, result.stdout[-500:]
    assert "import" in result.stdout and "split" in result.stdout


def test_importing_the_package_does_not_import_torch():
    code = "import handlens, handlens.data, handlens.core; import sys; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


COMMANDS = ["import", "datasets", "stats", "split", "demo", "annotate", "train", "lr-find", "evaluate", "predict",
            "explain", "trust", "agreement", "augment-preview", "serve", "study"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_group_is_assembled(command):
    assert command in runner.invoke(app, ["--help"]).stdout
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.stdout


def test_the_console_script_and_the_old_module_run_the_same_app():
    scripts = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, name = scripts["handlens"].partition(":")
    entry = getattr(importlib.import_module(module), name)
    from handlens.cli import main

    assert entry is main.run and main.app is app


def test_the_entry_point_leaves_what_is_alive_at_exit_out_of_the_final_collections(monkeypatch):
    """Python's collections at shutdown walk every object a torch + timm + Optuna command holds (1.3 s of its
    wall time); the entry point freezes them once the command has run, whether it succeeded or not."""
    import gc

    from handlens.cli import app as app_module

    def failing_command() -> None:
        raise SystemExit(3)

    monkeypatch.setattr(app_module, "app", failing_command)
    gc.unfreeze()
    try:
        with pytest.raises(SystemExit) as exited:
            app_module.run()
        assert exited.value.code == 3  # the command's own exit status is kept
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_an_option_named_by_a_run_config_key_says_how_to_give_the_key(monkeypatch, capsys):
    """`train --model.head=logistic` was Click's bare "No such option": the key=value form is the fix."""
    from handlens.cli import app as app_module

    assert app_module.dotted_option(["train", "--dataset", "d", "--out=a.b", "x.y=1"]) is None
    assert app_module.dotted_option(["predict", "--", "--odd.name.png"]) is None
    monkeypatch.setattr("sys.argv", ["handlens", "train", "--dataset", "d", "--model.head=logistic"])
    with pytest.raises(SystemExit) as exited:
        app_module.run()
    assert exited.value.code == 2
    assert ("error: --model.head=logistic: no handlens option has a dot; a run-config key is given without dashes, "
            "as key=value after the options (e.g. model.head=logistic)") in capsys.readouterr().err
