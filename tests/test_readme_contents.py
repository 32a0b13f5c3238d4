"""README is a front door: it opens with a contents list, and every link in it, and in docs/*.md where the depth
moved, reaches a file that exists and, for an anchor, a heading of that file (issue 19)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (not CJK), spaces to hyphens."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def headings(path: Path) -> set:
    """The anchors of a Markdown file's headings, those inside fenced code blocks left out."""
    found, fenced = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        match = re.match(r"^#{1,6} (.+)$", line)
        if match and not fenced:
            found.add(slug(match.group(1)))
    return found


def broken(path: Path, text: str) -> list:
    """The relative links of `text` (written in `path`) that reach no file, or no heading of the file they name."""
    wrong = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        file, _, anchor = target.partition("#")
        reached = (path.parent / file).resolve() if file else path
        if not reached.exists():
            wrong.append(target)
        elif anchor and reached.suffix == ".md" and anchor not in headings(reached):
            wrong.append(target)
    return wrong


def test_readme_opens_with_a_contents_list_whose_links_all_reach_a_heading():
    text = README.read_text(encoding="utf-8")
    head, _, _ = text.partition("## Two commands")
    assert "**Contents**" in head and "## Start here" in head  # before the commands
    contents = head.split("**Contents**", 1)[1].split("## Start here", 1)[0]
    links = LINK.findall(contents)
    assert len(links) >= 15
    assert any(link.startswith("docs/") for link in links)  # the depth that moved out is listed too
    missing = broken(README, contents)
    assert not missing, f"README's contents list links to headings that do not exist: {missing}"


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_reaches_a_file_and_heading(path):
    missing = broken(path, path.read_text(encoding="utf-8"))
    assert not missing, f"{path.relative_to(ROOT)} links to files or headings that do not exist: {missing}"
