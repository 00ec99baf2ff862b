"""Links of README.md and docs/*.md: relative files exist, #anchors name a heading of their page.

Anchors are GitHub's heading slugs: lower-cased (``İ`` becomes ``i`` + a combining dot, as in
Ruby), backticks and punctuation other than ``-`` and ``_`` dropped (letters and marks of any
script, Turkish ones included, stay), spaces turned into ``-``, and a repeated slug numbered
``-1``, ``-2``, ... External (http, https, mailto) links are not checked.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[([^\]\n]*)\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
EXTERNAL = ("http://", "https://", "mailto:")


def prose(text: str) -> list[str]:
    """The lines outside fenced code blocks, with inline code spans blanked out."""
    out, fence = [], None
    for line in text.splitlines():
        m = FENCE.match(line)
        if m:
            if fence is None:
                fence = m.group(1)
            elif m.group(1) == fence:
                fence = None
            out.append("")
            continue
        out.append("" if fence else line)
    return out


def slug(heading: str) -> str:
    s = heading.strip().lower().replace("`", "")
    s = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", s)  # a link in a heading keeps its text
    s = "".join(c for c in s if c in "- " or _word(c))
    return s.replace(" ", "-")


def _word(c: str) -> bool:
    """Ruby's \\p{Word}, which GitHub keeps: letters, combining marks, digits, connectors (``_``)."""
    cat = unicodedata.category(c)
    return cat[0] in "LM" or cat in ("Nd", "Pc")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose(page.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        s = slug(m.group(2))
        if s in seen:
            seen[s] += 1
            s = f"{s}-{seen[s]}"
        else:
            seen[s] = 0
        out.add(s)
    return out


def links(page: Path) -> list[tuple[int, str, str]]:
    out = []
    for n, line in enumerate(prose(page.read_text(encoding="utf-8")), 1):
        line = re.sub(r"`[^`]*`", "``", line)  # inline code holds no links
        for m in LINK.finditer(line):
            out.append((n, m.group(1), m.group(2)))
    return out


def test_slugs_are_githubs():
    assert slug("Where this differs from the authors' code") == "where-this-differs-from-the-authors-code"
    assert slug("Log-likelihood of an answer: `diffutron.likelihood.loglikelihood`") == \
        "log-likelihood-of-an-answer-diffutronlikelihoodloglikelihood"
    assert slug("Cost: `benchmarks/eval_cost.py`") == "cost-benchmarkseval_costpy"
    assert slug("Türkçe başlık, İstanbul'da") == "türkçe-başlık-i̇stanbulda"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_link_resolves(page):
    cache: dict[Path, set[str]] = {}
    bad = []
    found = links(page)
    for n, text, target in found:
        if not target or target.startswith(EXTERNAL):
            continue
        path, _, anchor = unquote(target).partition("#")
        dest = (page.parent / path).resolve() if path else page
        where = f"{page.relative_to(ROOT)}:{n}: [{text}]({target})"
        if not dest.exists():
            bad.append(f"{where}: no file {dest}")
            continue
        if anchor:
            if dest.suffix != ".md":
                bad.append(f"{where}: an anchor into a file that is not Markdown")
                continue
            if dest not in cache:
                cache[dest] = anchors(dest)
            if anchor not in cache[dest]:
                bad.append(f"{where}: no heading #{anchor} in {dest.name}")
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_the_readme_links_every_docs_page():
    linked = {(ROOT / unquote(t).partition("#")[0]).resolve() for _, _, t in links(ROOT / "README.md")
              if not t.startswith(EXTERNAL) and not t.startswith("#")}
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not missing, f"README.md links no docs page named {missing}"
