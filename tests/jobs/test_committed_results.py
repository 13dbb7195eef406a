"""docs/results.md and the README's headline block are what `invgan report` makes of the tracked rows in results/
(issue #22: anyone can re-derive every cell from the repository). After a run adds rows, regenerate:
`invgan report`, and commit results/, docs/ and README.md together."""

from __future__ import annotations

import difflib
import shutil
from pathlib import Path

from jobs.paper_report import HEADLINE_END, HEADLINE_START, build_report
from jobs.paper_spec import RESULTS_DIR

PROJECT = Path(__file__).resolve().parents[2]


def _diff(committed: str, regenerated: str, name: str) -> str:
    lines = difflib.unified_diff(
        committed.splitlines(), regenerated.splitlines(), f"{name} (committed)", f"{name} (regenerated)", lineterm=""
    )
    return "\n".join(list(lines)[:40])


def _headline(text: str) -> str:
    return text[text.index(HEADLINE_START) : text.index(HEADLINE_END)]


def test_the_committed_report_is_what_the_committed_rows_give(tmp_path):
    readme = tmp_path / "README.md"
    shutil.copy(PROJECT / "README.md", readme)
    written = build_report(tmp_path / "docs", runs=RESULTS_DIR, readme=readme)

    committed, regenerated = (PROJECT / "docs" / "results.md").read_text(), written.read_text()
    assert regenerated == committed, "run `invgan report` and commit docs/:\n" + _diff(
        committed, regenerated, "docs/results.md"
    )
    old, new = _headline((PROJECT / "README.md").read_text()), _headline(readme.read_text())
    assert new == old, "run `invgan report` and commit README.md:\n" + _diff(old, new, "README headline")
    figures = {p.name for p in (tmp_path / "docs" / "figures").glob("*.png")}
    missing = sorted(f for f in figures if not (PROJECT / "docs" / "figures" / f).exists())
    assert not missing, f"figures the report makes but docs/figures/ lacks: {missing}"


def test_results_holds_rows_not_bulk():
    """Tracked rows stay compact (the issue: tens of MB in all) and hold no lock or quarantine files."""
    # a running job's .lock and quarantined damaged/ shards are git-ignored: never committed
    files = [
        p
        for p in RESULTS_DIR.rglob("*")
        if p.is_file() and p.name != ".lock" and "damaged" not in p.relative_to(RESULTS_DIR).parts
    ]
    assert files, "results/ is empty"
    total = sum(p.stat().st_size for p in files)
    assert total < 60e6, f"results/ holds {total / 1e6:.0f} MB; keep rows compact (Parquet rows, summaries, configs)"
    allowed = {".parquet", ".json", ".log", ".csv", ".yaml", ".png", ".md"}
    odd = sorted(str(p.relative_to(RESULTS_DIR)) for p in files if p.suffix not in allowed)
    assert not odd, f"files in results/ that are neither rows, summaries nor configs: {odd[:5]}"
