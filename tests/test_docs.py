"""Every relative link in README.md, BENCHMARKS.md and docs/ leads to a file that exists, and every #anchor to a
heading of that file, as GitHub names it: a reader who follows one never lands on nothing."""

import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").rglob("*.md"))]


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def prose(page: Path) -> str:
    """The page without its code blocks, which hold neither links nor headings (a shell comment is not one)."""
    return re.sub(r"```.*?```", "", page.read_text(), flags=re.S)


@functools.cache
def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings, read once however many links point into it."""
    return {anchor(h) for h in re.findall(r"^#+ (.*)$", prose(page), re.M)}


def links(page: Path) -> list[str]:
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", prose(page)) if not re.match(r"[a-z]+:", t)]


def test_anchors_are_named_as_github_names_them():
    assert (
        anchor("A budget that shows both: 2,800 steps (all images)")
        == "a-budget-that-shows-both-2800-steps-all-images"
    )
    assert anchor("Why the shortcuts help: the paper's Fig. 7") == "why-the-shortcuts-help-the-papers-fig-7"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_a_pages_links_lead_somewhere(page):
    broken = []
    for target in links(page):
        path, _, name = target.partition("#")
        file = page.parent / path if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif name and file.suffix == ".md" and name not in anchors(file.resolve()):
            broken.append(f"{target}: no such heading")
    assert not broken, broken
