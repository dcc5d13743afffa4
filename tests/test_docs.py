"""The participant documentation keeps its promises: every bad-input row names a test that exists,
every fill-in table has the columns `workshop report` prints, every relative link resolves, the
README stays short, and no participant page carries a card's UUID or a measurement's date.

    pytest tests/test_docs.py          # a second or so: reads files and workshop.report's column lists
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from workshop import report

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
RUNGS = ("baseline", "deepspeed_single_gpu", "offload", "multi_node")
# Participant pages: the README, every folder's README and docs/. BENCHMARKS.md is the one place for
# cards, versions and dates.
PARTICIPANT_DOCS = sorted([REPO / "README.md", *REPO.glob("*/README.md"), *(REPO / "docs").glob("*.md")])

# `workshop report`'s rung tables, in this order: the rung's extras follow, then "perplexity" where a
# table trains on WikiText. (tests/test_report.py checks the report prints these from run folders.)
COLUMNS = [header for header, _ in report.RUNG_COLUMNS]
EXTRAS = {rung: [header for header, _ in report.RUNG_EXTRAS.get(rung, [])] for rung in RUNGS}


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def tables(text: str) -> list[list[str]]:
    """Each Markdown table as its lines (header, separator, rows)."""
    found, current = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            found.append(current)
            current = []
    return found + ([current] if current else [])


def outside_excerpts(text: str) -> str:
    """The text without the `<!-- excerpt: ... -->` blocks, which are labelled with their machine and date."""
    return re.sub(r"<!-- excerpt: .*?-->.*?<!-- /excerpt -->", "", text, flags=re.S)


# ------------------------------------------------------------------------------------ bad input
def catalogue_rows() -> list[list[str]]:
    table = next(t for t in tables((REPO / "docs" / "bad-input.md").read_text()) if t[0].startswith("| input |"))
    return [cells(line) for line in table[2:] if not line.startswith("| **")]


def test_every_bad_input_row_names_a_test_that_exists():
    rows = catalogue_rows()
    assert len(rows) >= 50
    sources = {path.name: path.read_text() for path in TESTS.glob("test_*.py")}
    for row in rows:
        named = row[-1].strip("`")
        module, _, name = named.rpartition("::")
        source = sources[module or "test_bad_input.py"]
        function, _, case = name.partition("[")
        assert re.search(rf"^def {function}\(", source, re.M), (row[0], named)
        if case:
            assert f'"{case.rstrip("]")}"' in source, (row[0], named)


# ---------------------------------------------------------------------------------- rung tables
@pytest.mark.parametrize("rung", RUNGS)
def test_fill_in_tables_have_the_report_columns(rung):
    text = (REPO / rung / "README.md").read_text()
    fill_in = [t for t in tables(text) if t[0].startswith("| run | setting |")]
    assert fill_in, f"{rung}/README.md has no fill-in table"
    for table in fill_in:
        header = cells(table[0])
        expected = COLUMNS + EXTRAS[rung]
        assert header in (expected, expected + ["perplexity"]), (rung, header)
        for row in table[2:]:
            assert re.match(r"\| \(\d+\) \|", row), f"{rung}: a row without the number of its command: {row}"
            number = cells(row)[0]
            assert re.search(rf"# {re.escape(number)}(\s|$)", text, re.M), f"{rung}: row {number} has no command"


@pytest.mark.parametrize("rung", RUNGS)
def test_each_rung_is_an_exercise_of_the_same_shape(rung):
    text = (REPO / rung / "README.md").read_text()
    headings = re.findall(r"^## (.+)$", text, re.M)
    for wanted in ("Goal", "Run it", "What you should see", "What to look at", "Fill in the table", "Questions",
                   "Try"):
        assert any(h.startswith(wanted) for h in headings), (rung, wanted, headings)
    questions = re.search(r"^## Questions$(.*?)^## ", text, re.M | re.S).group(1)
    numbered = re.findall(r"^\d+\. ", questions, re.M)
    assert 3 <= len(numbered) <= 5, (rung, len(numbered))
    assert questions.count("<details><summary>Check your answer</summary>") == len(numbered), rung
    assert re.search(r"<!-- excerpt: [\w/.]+ -->", text) and "<!-- /excerpt -->" in text, rung


# -------------------------------------------------------------------------------- size and dates
def test_the_readme_is_short():
    assert len((REPO / "README.md").read_text().splitlines()) <= 250


def test_benchmarks_holds_the_current_results_only():
    assert (REPO / "BENCHMARKS.md").stat().st_size <= 40 * 1024


@pytest.mark.parametrize("path", PARTICIPANT_DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_participant_docs_name_no_card_and_no_date(path):
    text = outside_excerpts(path.read_text())
    assert not re.search(r"GPU-[0-9a-f]{6}", text), "a card's UUID: results go to BENCHMARKS.md"
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", text), "a date: measurements go to BENCHMARKS.md"


# ----------------------------------------------------------------------------------------- links
def anchors(path: Path) -> set[str]:
    """GitHub's anchors for a Markdown file's headings, and explicit <a id=...>."""
    text = path.read_text()
    found = set(re.findall(r'<a id="([^"]+)"', text))
    for heading in re.findall(r"^#+ (.+)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", "")).replace(" ", "-")
        found.add(slug)
    return found


@pytest.mark.parametrize("path", [*PARTICIPANT_DOCS, REPO / "BENCHMARKS.md"], ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(path):
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        assert linked.exists(), f"{path.name}: {target}"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{path.name}: {target}"
