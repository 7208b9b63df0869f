"""The README is a contract: its settings table is the Settings class, its set-up is two commands,
and CI runs exactly the README's test command."""

from __future__ import annotations

import re

from app.settings import Settings, write_readme_table
from tests.conftest import REPO


def test_readme_settings_table_is_the_settings_class() -> None:
    readme = (REPO / "README.md").read_text()
    assert write_readme_table(readme) == readme, "run `python -m app.settings --write-readme`"
    documented = set(re.findall(r"`SHOTCACHE_([A-Z_]+)`", readme))
    assert {name.upper() for name in Settings.model_fields} <= documented


def test_quick_start_is_two_make_commands_and_ci_runs_the_test_one() -> None:
    readme = (REPO / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", quick_start, re.S)
    assert block is not None
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]
    assert commands == ["make serve", "make test"]
    ci = (REPO / ".ci" / "run").read_text()
    assert [line for line in ci.splitlines() if line.startswith("make")] == ["make test"]
