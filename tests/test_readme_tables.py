"""Every measured table in the README is quoted from a report a command wrote.

The reports under ``benchmarks/results/`` are rendered from the JSON of the run that measured them; the README
may quote a subset of a report's rows but never retype them, so a number in the README can be traced to a JSON
and goes stale visibly (the quoted line stops matching) when the report is regenerated. A table that measures
nothing (the backends' capabilities) is preceded by the comment ``<!-- documentation table: ... -->``.
"""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results"
DOC_MARK = "<!-- documentation table:"


def markdown_tables(text: str) -> list[tuple[int, str, list[str]]]:
    """(first line number, the line before the table, the table's lines) for every pipe table in ``text``."""
    tables: list[tuple[int, str, list[str]]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|"):
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            tables.append((i + 1, lines[i - 1] if i else "", lines[i:j]))
            i = j
        else:
            i += 1
    return tables


def _is_separator(line: str) -> bool:
    return set(line.replace("|", "").strip()) <= {"-", ":", " "}


def unquoted_rows(readme: str, reports: list[str]) -> list[tuple[int, str]]:
    """(README line, row) for each row of a measured README table that no report has as a line of its own."""
    known = {line for report in reports for line in report.splitlines() if line.startswith("|")}
    missing = []
    for first, before, table in markdown_tables(readme):
        if before.startswith(DOC_MARK):
            continue
        missing += [(first + k, row) for k, row in enumerate(table) if not _is_separator(row) and row not in known]
    return missing


def test_checker_flags_a_retyped_row_and_passes_a_quoted_subset():
    report = "# r\n\n| variant | ms |\n|---|---|\n| ours | 1.23 |\n| peer | 4.56 |\n"
    quoted = "text\n\n| variant | ms |\n|---|---|\n| peer | 4.56 |\n"
    assert unquoted_rows(quoted, [report]) == []
    retyped = "text\n\n| variant | ms |\n|---|---|\n| peer | 4.6 |\n"
    assert unquoted_rows(retyped, [report]) == [(5, "| peer | 4.6 |")]
    documented = f"text\n{DOC_MARK} capabilities -->\n| backend | dtypes |\n|---|---|\n| cpu | fp32 |\n"
    assert unquoted_rows(documented, [report]) == []


@pytest.mark.skipif(not README.exists() or not RESULTS.is_dir(), reason="needs the source checkout")
def test_readme_tables_are_quoted_from_reports():
    reports = [p.read_text() for p in sorted(RESULTS.rglob("*.md"))]
    missing = unquoted_rows(README.read_text(), reports)
    assert not missing, "README rows that no report under benchmarks/results has verbatim:\n" + "\n".join(
        f"  README.md:{n}: {row}" for n, row in missing)
