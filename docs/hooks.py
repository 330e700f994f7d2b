"""MkDocs hook: the command-line page shows each command's ``--help`` as the installed CLI prints it.

The help text is rendered at build time from the typer app, so the page cannot fall behind the code.
"""
from __future__ import annotations

import os

MARKER = "<!-- cli-reference -->"


def _help(args: list[str]) -> str:
    from typer.testing import CliRunner

    from vitprune.cli import app

    result = CliRunner().invoke(app, [*args, "--help"], prog_name="vitprune", env={"COLUMNS": "100", "NO_COLOR": "1", "TERM": "dumb"})
    if result.exit_code != 0:
        raise RuntimeError(f"vitprune {' '.join(args)} --help failed: {result.output}")
    return result.output.rstrip()


def command_names() -> list[str]:
    from vitprune.cli import app

    return [cmd.name or cmd.callback.__name__ for cmd in app.registered_commands]  # type: ignore[union-attr]


def on_page_markdown(markdown: str, page, **kwargs) -> str:  # noqa: ANN001 (MkDocs hook signature)
    if MARKER not in markdown:
        return markdown
    os.environ.setdefault("COLUMNS", "100")
    parts = [f"```text\n$ vitprune --help\n{_help([])}\n```"]
    for name in command_names():
        parts.append(f"## `vitprune {name}`\n\n```text\n$ vitprune {name} --help\n{_help([name])}\n```")
    return markdown.replace(MARKER, "\n\n".join(parts))
