"""The README's command table lists every command and every flag (serve included), so it never falls behind."""

from pathlib import Path

import typer

from handlens.cli.app import app

README = Path(__file__).resolve().parents[2] / "README.md"


def commands(group, prefix=""):
    for name, command in group.commands.items():
        full = f"{prefix} {name}".strip()
        if hasattr(command, "commands"):
            yield from commands(command, full)
        else:
            yield full, command


def test_every_command_and_flag_is_in_the_readme_table():
    rows = [line for line in README.read_text().splitlines() if line.startswith("| `handlens")]
    missing = {}
    for full, command in commands(typer.main.get_command(app)):
        words = full.split()
        # `handlens study show ...` / `study list` / ... share a row
        mine = [r for r in rows if f"`handlens {full}" in r or f"`{' '.join(words)}" in r]
        flags = [o for p in command.params for o in getattr(p, "opts", []) if o.startswith("--")
                 and o not in ("--help", "--json")]
        if not mine:
            missing[full] = ["no row"]
        elif [f for f in flags if f not in " ".join(mine)]:
            missing[full] = [f for f in flags if f not in " ".join(mine)]
    assert not missing, f"add these to the README's command table: {missing}"
