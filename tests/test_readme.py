"""README.md is built from docs/readme/*.md (`make readme`) and opens with the two commands."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_is_built_from_its_parts() -> None:
    parts = re.search(r"^README_PARTS := (.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert parts is not None
    expected = ""
    for name in parts.group(1).split():
        path = ROOT / "docs" / "readme" / f"{name}.md"
        if path.exists():
            expected += path.read_text() + "\n"
    assert (ROOT / "README.md").read_text() == expected, "README.md is stale: run `make readme`"


def test_readme_opens_with_a_two_command_quickstart() -> None:
    text = (ROOT / "README.md").read_text()
    first_section = text.split("\n## ", 2)[1]
    assert first_section.startswith("Quickstart")
    block = first_section.split("```sh\n", 1)[1].split("```", 1)[0]
    assert block.split() == ["make", "demo", "make", "test"]


def test_readme_documents_every_cli_verb() -> None:
    text = (ROOT / "README.md").read_text()
    out = subprocess.run(
        [str(Path(__import__("sys").executable).with_name("gateway")), "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    verbs = re.findall(r"│ (\w[\w-]*)\s{2,}", out)
    assert {"serve", "demo", "model-server", "rollback", "flags"} <= set(verbs)
    for verb in verbs:
        assert f"gateway {verb}" in text or f"{verb}|" in text or f"|{verb}" in text, verb
