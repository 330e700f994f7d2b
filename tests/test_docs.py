"""Every ``python`` block of the README and the documentation runs, and every CLI command and public function is
documented.

A block preceded by ``<!-- test-replace: OLD => NEW -->`` runs with OLD replaced by NEW (small settings for long
examples; the replacement must apply). Blocks run in a fresh temporary working directory, one namespace per page, in
page order, so a page may build on its earlier blocks; methods and backends a block registers are removed after it.
"""
from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

import vitprune
import vitprune.assets
from vitprune import registry

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"(?:<!-- test-replace: (?P<old>.+?) => (?P<new>.+?) -->\n)?```python\n(?P<code>.*?)```", re.S)
NEEDS_ASSETS = ('"testbed"', "dinov2_vits14", "assets_dir")


def _blocks(page: Path) -> list[str]:
    blocks = []
    for m in BLOCK.finditer(page.read_text()):
        code = m["code"]
        if m["old"] is not None:
            assert m["old"] in code, f"{page.name}: test-replace text {m['old']!r} is not in the block below it"
            code = code.replace(m["old"], m["new"])
        blocks.append(code)
    return blocks


PAGES_WITH_CODE = [p for p in PAGES if _blocks(p)]


@pytest.fixture
def clean_registries():
    """Forget the methods and backends that a page's code registered (built-in ones may register meanwhile)."""
    yield
    for name in [n for n, cls in registry._METHODS.items() if cls.__module__.startswith("docs_")]:
        del registry._METHODS[name]
    for name in [n for n, (matches, _) in registry._BACKENDS.items() if matches.__module__.startswith("docs_")]:
        del registry._BACKENDS[name]


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=lambda p: str(p.relative_to(ROOT)))
def test_code_blocks_run(page: Path, tmp_path, monkeypatch, clean_registries, one_thread) -> None:
    blocks = _blocks(page)
    if any(marker in code for code in blocks for marker in NEEDS_ASSETS):
        try:
            monkeypatch.setenv("VITPRUNE_ASSETS", str(vitprune.assets.assets_dir()))
        except FileNotFoundError as err:
            pytest.skip(f"{page.name} uses the shared assets: {err}")
    monkeypatch.chdir(tmp_path)
    module = types.ModuleType(f"docs_{page.stem}")  # a real module: dataclasses and pickle look classes up there
    monkeypatch.setitem(sys.modules, module.__name__, module)
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"{page.relative_to(ROOT)}[block {i}]", "exec"), module.__dict__)
        except Exception as err:  # say which block failed, then let pytest show the traceback
            raise AssertionError(f"{page.relative_to(ROOT)}: python block {i} failed: {err!r}") from err


def test_every_cli_command_and_public_name_is_documented() -> None:
    from vitprune.cli import app

    docs = "\n".join(p.read_text() for p in PAGES)
    cli_page = (ROOT / "docs" / "cli.md").read_text()
    assert "<!-- cli-reference -->" in cli_page  # the hook renders every command's --help there
    commands = [c.name or c.callback.__name__ for c in app.registered_commands]
    missing = [c for c in commands if f"vitprune {c}" not in docs]
    assert not missing, f"CLI commands never shown in the docs: {missing}"
    undocumented = [name for name in vitprune.__all__ if name not in docs]
    assert not undocumented, f"public names missing from the docs: {undocumented}"


def test_readme_is_a_front_door() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; move detail into docs/"
