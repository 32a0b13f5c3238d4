"""README is a front door: it opens with a contents list, and every link in it reaches a heading (issue 19)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (not CJK), spaces to hyphens."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def test_readme_opens_with_a_contents_list_whose_links_all_reach_a_heading():
    text = README.read_text(encoding="utf-8")
    head, _, _ = text.partition("## Two commands")
    assert "**Contents**" in head and "## Start here" in head  # before the commands
    contents = head.split("**Contents**", 1)[1].split("## Start here", 1)[0]
    anchors = re.findall(r"\]\(#([^)]+)\)", contents)
    assert len(anchors) >= 15
    headings = {slug(h) for h in re.findall(r"^#{2,3} (.+)$", text, flags=re.MULTILINE)}
    missing = [a for a in anchors if a not in headings]
    assert not missing, f"README's contents list links to headings that do not exist: {missing}"
