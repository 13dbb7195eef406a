"""`invgan report`: docs/results.md regenerated from a real (tiny) run's rows, with the paper's numbers beside."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from jobs.config import load_config
from jobs.evaluate import EvalWorker
from jobs.results import build_report, combined_correct
from jobs.runner import shard_path, write_shard

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fixture_run(tmp_path_factory):
    """A 4-example smoke evaluation written as `invgan eval` would, and a paper-numbers file naming it."""
    tmp = tmp_path_factory.mktemp("report")
    raw = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text()) | {"name": "tiny_repro", "limit": 4}
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (tmp / "never_run.yaml").write_text(yaml.safe_dump(raw | {"name": "never_run"}, sort_keys=False))
    cfg = load_config(tmp / "tiny.yaml")
    rows = EvalWorker(cfg.model_dump(mode="json")).run_shard(0, 0, 4)
    run_dir = tmp / "runs" / f"{cfg.name}-{cfg.config_hash()[:12]}"
    write_shard(shard_path(run_dir, 0), rows)
    paper = {
        "tiny_accuracy": {
            "config": str(tmp / "tiny.yaml"),
            "title": "Tiny table",
            "source": "a paper, Table 9",
            "metric": "accuracy",
            "columns": {"clean": ["clean"], "fgsm": ["fgsm"], "both": ["fgsm", "bpda"]},
            "paper": {"invgan": {"clean": 0.99, "fgsm": 0.78}},
            "notes": "Why ours differ: tiny.",
        },
        "tiny_auc": {
            "config": str(tmp / "tiny.yaml"),
            "title": "Tiny AUC",
            "source": "a paper, Table 10",
            "metric": "auc",
            "columns": {"fgsm": ["fgsm"]},
            "paper": {"invgan": {"fgsm": 0.9985}},
        },
        "missing": {"config": str(tmp / "never_run.yaml"), "title": "Never run", "source": "-", "columns": {}},
    }
    (tmp / "paper.yaml").write_text(yaml.safe_dump(paper, allow_unicode=True, sort_keys=False))
    out = build_report(tmp / "docs", runs=tmp / "runs", paper_numbers=tmp / "paper.yaml")
    return out, rows


def test_report_sets_our_cells_beside_the_papers_with_n(fixture_run):
    out, rows = fixture_run
    text = out.read_text()
    assert text.startswith("# Results") and "do not edit by hand" in text
    assert "## Tiny table" in text and "## Tiny AUC" in text and "a paper, Table 9" in text
    assert text.index("## Tiny table") < text.index("## Tiny AUC") < text.index("## Never run")  # the file's order
    assert "| defense | clean | fgsm | both |" in text and text.index("| none |") < text.index("| invgan |")
    inv = rows[rows["defense"] == "invgan"].set_index(["attack", "example_id"])["correct"]
    clean = inv["clean"].mean()
    assert f"**{clean:.2f}** (n=4) · paper 0.99" in text
    assert "paper 0.9985" in text and "Gradient-masking checks:" in text and "Why ours differ: tiny." in text
    assert (out.parent / "figures" / "tiny_accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_a_table_without_its_run_says_how_to_make_it(fixture_run):
    text = fixture_run[0].read_text()
    assert "## Never run" in text and "*Not run yet.* `invgan eval --config" in text


def test_a_column_of_several_attacks_is_the_per_example_worst(fixture_run):
    out, rows = fixture_run
    d = rows[rows["defense"] == "none"]
    wide = d.pivot(index="example_id", columns="attack", values="correct")
    expected = (wide["fgsm"] & wide["bpda"]).mean()
    assert combined_correct(d, ["fgsm", "bpda"]).mean() == expected
    assert combined_correct(d, ["fgsm", "absent"]) is None
    assert f"**{expected:.2f}** (n=4)" in out.read_text()


def test_the_shipped_paper_numbers_name_real_configs_and_columns():
    from jobs.results import PAPER_NUMBERS, REPRO_DIR

    for key, spec in yaml.safe_load(PAPER_NUMBERS.read_text()).items():
        cfg = load_config(REPRO_DIR / spec["config"])
        for column, attacks in spec["columns"].items():
            assert set(attacks) <= {"clean", *cfg.attacks}, (key, column)
        assert set(spec["paper"]) <= set(cfg.defenses), key
