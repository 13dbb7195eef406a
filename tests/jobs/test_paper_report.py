"""`invgan report`: docs/results.md regenerated from a real (tiny) run's rows, with the paper's numbers beside."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from jobs import stats
from jobs.config import load_config
from jobs.evaluate import EvalWorker
from jobs.paper_report import build_report, combined_correct, prefix_agreement
from jobs.run_folder import shard_path, write_shard

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
            "protocol": {
                "defenses.invgan.params.optimizer": {"paper": "sgd", "source": "eq. 6"},
                "attacks.fgsm.params.eps": 0.3,
                "weights.inverter.training.steps_done": 100000,
                "limit": 4,
            },
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
    clean = stats.wilson(int(inv["clean"].sum()), 4)
    assert f"**{clean.value:.2f}** [{clean.low:.2f}, {clean.high:.2f}] (n=4) · paper 0.99: *n too small*" in text
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
    i = stats.wilson(round(expected * 4), 4)
    assert f"**{expected:.2f}** [{i.low:.2f}, {i.high:.2f}] (n=4)" in out.read_text()


def test_the_shipped_paper_numbers_name_real_configs_and_columns():
    from jobs.paper_spec import (
        PAPER_NUMBERS,
        REPRO_DIR,
        CurvesTable,
        DistortionTable,
        RecoveryTable,
        RedTable,
        RedTheoryTable,
        load_paper_numbers,
    )
    from jobs.red import RedConfig

    kinds = set()
    for key, spec in load_paper_numbers(PAPER_NUMBERS).items():
        kinds.add(spec.kind)
        if isinstance(spec, RedTheoryTable):
            continue
        if isinstance(spec, RecoveryTable):
            from jobs.recovery import RecoveryConfig

            rec = load_config(REPRO_DIR / spec.config, model=RecoveryConfig)
            assert spec.paper.table1 and set(spec.paper.table1) <= set(rec.constraints), key
            continue
        if isinstance(spec, RedTable):
            red = load_config(REPRO_DIR / spec.config, model=RedConfig)
            for which, by_method in spec.paper.model_dump().items():
                assert set(by_method) <= set(red.methods), key
                for cells in by_method.values():
                    assert set(cells) <= {"clean", *red.dictionary.attacks}, (key, which)
            continue
        cfg = load_config(REPRO_DIR / spec.config)
        if isinstance(spec, CurvesTable):
            assert cfg.curves is not None and {spec.cheap, spec.reference} <= set(cfg.curves.defenses), key
            continue
        if isinstance(spec, DistortionTable):
            assert set(spec.attacks) <= set(cfg.attacks), key
            continue
        attacks_of_runs = {"clean", *cfg.attacks}
        for also in spec.also:  # another config's run on the same examples adds its attacks
            more = load_config(REPRO_DIR / also)
            assert (more.dataset, more.limit, more.weights) == (cfg.dataset, cfg.limit, cfg.weights), (key, also)
            attacks_of_runs |= set(more.attacks)
        for column, attacks in spec.columns.items():
            assert set(attacks) <= attacks_of_runs, (key, column)
        assert (spec.convergence or "clean") in attacks_of_runs, key
        assert spec.paper and set(spec.paper) <= set(cfg.defenses), key
        assert set(spec.column_metrics.values()) <= {"accuracy", "auc", "mse"}, key
        if spec.compare is not None:
            assert {spec.compare.cheap, spec.compare.reference} <= set(cfg.defenses), key
    assert kinds == {"eval", "curves", "red", "distortion", "red_theory", "recovery"}


def test_a_bad_paper_numbers_file_stops_the_report_naming_the_table_and_field(tmp_path):
    """Every problem of the file in one line, each with its table's key and field, before anything is written."""
    good = {"config": "table2_mnist.yaml", "title": "T", "source": "-", "columns": {"clean": ["clean"]}}
    cases = {
        "misspelt": ({"t": good | {"colums": {}}}, ["t.colums: Extra inputs are not permitted"]),
        "missing": ({"t": {k: v for k, v in good.items() if k != "title"}}, ["t.title: Field required"]),
        "kind": ({"t": good | {"kind": "evaluation"}}, ["t.kind: 'evaluation' is not a kind of table; choose one of"]),
        "metric": ({"t": good | {"metric": "acc"}}, ["t.metric: Input should be 'accuracy', 'auc' or 'mse'"]),
        "empty column": ({"t": good | {"columns": {"clean": []}}}, ["t.columns.clean: List should have at least 1"]),
        "paper column": (
            {"t": good | {"paper": {"invgan": {"fgsm": 0.78}}}},
            ["t: paper: ['fgsm'] are not columns of the table (clean)"],
        ),
        "two tables": (
            {"a": good | {"also": "x.yaml"}, "b": {"kind": "red_theory", "title": "-", "source": "-", "folder": ".."}},
            ["a.also: Input should be a valid list", "; b.folder: '..': give a plain folder name"],
        ),
        "not tables": ([good], ["expected a mapping of tables"]),
    }
    for name, (raw, expected) in cases.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        with pytest.raises(SystemExit) as stop:
            build_report(tmp_path / "docs", runs=tmp_path / "runs", paper_numbers=path)
        message = str(stop.value.code)
        assert message.startswith(f"{path}: ") and "\n" not in message, name
        assert all(e in message for e in expected), (name, message)
    assert not (tmp_path / "docs").exists()


def test_a_runs_folder_without_any_run_stops_the_report_with_the_command_that_makes_one(fixture_run, tmp_path):
    """No empty report: a runs folder holding no run of any table (absent, empty or only other folders) ends
    the command with one line naming the folder and an `invgan eval` command; nothing is written."""
    from jobs.paper_report import HEADLINE_END, HEADLINE_START

    readme = tmp_path / "README.md"
    readme.write_text(f"{HEADLINE_START}\nstale numbers\n{HEADLINE_END}\n")
    (tmp_path / "other" / "unrelated-0123456789ab").mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    for runs in (tmp_path / "absent", tmp_path / "empty", tmp_path / "other"):
        with pytest.raises(SystemExit) as stop:
            build_report(tmp_path / "docs", runs=runs, readme=readme)  # the shipped paper numbers
        assert stop.value.code == (
            f"no run folders of the configs in configs/repro/ found in {runs}: `invgan eval --config "
            "configs/repro/table2_mnist.yaml` makes one (or point --runs at the folder that holds them)"
        )
    tmp = fixture_run[0].parent.parent  # a file whose configs are elsewhere names its first eval config
    with pytest.raises(SystemExit) as stop:
        build_report(tmp_path / "docs", runs=tmp_path / "empty", paper_numbers=tmp / "paper.yaml")
    assert f"`invgan eval --config {tmp / 'tiny.yaml'}` makes one" in str(stop.value.code)
    assert not (tmp_path / "docs").exists() and "stale numbers" in readme.read_text()


def test_an_mse_column_and_the_paired_verdict(fixture_run, tmp_path):
    """`column_metrics: {mse: mse}` turns a clean row's image-space distance into a per-pixel MSE; `compare`
    states plainly whether the cheap defense matches the reference on the same examples."""
    from jobs.paper_report import mse_cells, paired_comparison

    _, rows = fixture_run
    inv = rows[(rows.defense == "invgan") & (rows.attack == "clean")]
    cells = mse_cells(rows, {"mse": ["clean"]}, {"invgan": {"mse": 0.1}}, size=64)
    assert cells["invgan"]["mse"].ours == pytest.approx((inv.detection_score**2).mean() / 64)
    assert cells["invgan"]["mse"].n == 4 and cells["invgan"]["mse"].paper == 0.1
    # a known answer: the cheap defense right on 3 of 4, the reference on all 4 -> short by 0.25
    fake = pd.DataFrame(
        {
            "example_id": [0, 1, 2, 3] * 2,
            "attack": ["clean"] * 8,
            "defense": ["cheap"] * 4 + ["ref"] * 4,
            "correct": [True, True, True, False] + [True] * 4,
        }
    )
    (line,) = paired_comparison(fake, "cheap", "ref", {"clean": ["clean"]})
    assert "0.75 vs 1.00 (n=4; difference -0.25 [" in line and line.endswith("**n too small**")
    same = pd.concat([fake.assign(example_id=fake.example_id + 4 * k, correct=True) for k in range(10)])
    assert paired_comparison(same, "cheap", "ref", {"clean": ["clean"]})[0].endswith("**reproduced**")
    many = pd.concat([fake.assign(example_id=fake.example_id + 4 * k) for k in range(10)])  # n = 40, -0.25 ± 0.13
    assert paired_comparison(many, "cheap", "ref", {"clean": ["clean"]})[0].endswith("**undecided**")
    lots = pd.concat([fake.assign(example_id=fake.example_id + 4 * k) for k in range(100)])  # n = 400: ± 0.04
    assert paired_comparison(lots, "cheap", "ref", {"clean": ["clean"]})[0].endswith("**not reproduced (below)**")


def test_an_ablation_sets_each_cell_against_the_same_cell_of_the_other_run_on_shared_examples():
    """`versus`: defense by defense (only the ones named), column by column, on the examples both runs have;
    the paired difference is this run minus the other and the claim is no difference."""
    from jobs.paper_report import versus_lines

    def run(correct_dg: list[bool], ids: list[int]) -> pd.DataFrame:
        n = len(ids)
        return pd.DataFrame(
            {
                "example_id": ids * 2,
                "attack": ["bpda"] * (2 * n),
                "defense": ["dg"] * n + ["none"] * n,
                "correct": correct_dg + [False] * n,
            }
        )

    ours = run([True, False, True, True] * 25 + [True], list(range(101)))  # one example the other lacks
    theirs = run([True, False, False, True] * 25, list(range(100)))
    (line,) = versus_lines(ours, theirs, {"bpda": ["bpda"]}, ["dg"])  # `none` not asked for
    assert line.startswith("- dg, bpda: 0.75 vs 0.50 (n=100; difference +0.25 [")
    assert line.endswith("**not reproduced (above)**")  # +0.25 with 100 pairs: 0 lies outside, ours higher
    assert versus_lines(ours, theirs.assign(example_id=theirs.example_id + 1000), {"bpda": ["bpda"]}, ["dg"]) == []


def test_the_recovery_ordering_is_read_on_paired_trials():
    """Lipton & Tripathi's ordering per ε on the same trials: a clear gain holds, a loss is reversed, equal
    rows are not decided."""
    from jobs.paper_report import ordering_text

    n = 200
    err = {
        "none": np.full(n, 0.5),  # never recovered at ε = 0.1
        "clip": np.where(np.arange(n) < 100, 0.01, 0.5),  # half recovered
        "stochastic_clip": np.where(np.arange(n) < 50, 0.01, 0.5),  # a quarter: fewer than clip
    }
    rows = pd.DataFrame(
        [{"table": 1, "trial": t, "constraint": c, "sq_err": e[t]} for c, e in err.items() for t in range(n)]
    )
    text = ordering_text(rows, [0.1, 1.0])
    clip_none, stoch_clip, stoch_none = [line for line in text.splitlines() if line.startswith("| ") and "−" in line]
    assert "+0.500 [" in clip_none and "*holds*" in clip_none.split("|")[2]
    assert "-0.250 [" in stoch_clip and "*reversed*" in stoch_clip.split("|")[2]
    assert all("+0.000 [+0.000, +0.000] *not decided*" in line.split("|")[3] for line in (clip_none, stoch_none))


def test_cells_carry_intervals_and_the_table_counts_its_verdicts():
    """An accuracy cell prints its Wilson interval and its verdict against the paper; an AUC prints the decimals
    its bootstrap interval supports; the table's verdicts are counted in one line."""
    from jobs.paper_report import Cell, cells_markdown, verdict_line

    cells = {
        "a": {
            "x": Cell(0.25, 20, 0.87, stats.wilson(5, 20)),  # [0.11, 0.47]: wider than ±0.10
            "y": Cell(0.9, 400, 0.9, stats.wilson(360, 400)),  # the paper inside
            "z": Cell(0.5, 400, 0.9, stats.wilson(200, 400)),  # the paper far above
        },
        "b": {"x": Cell(0.5, 4, 0.5, stats.wilson(2, 4)), "y": Cell(None, 0, 0.9), "z": Cell(0.3, 10, None)},
    }
    text = cells_markdown(cells, 2)
    assert "**0.25** [0.11, 0.47] (n=20) · paper 0.87: *undecided*" in text
    assert "**0.90** [0.87, 0.93] (n=400) · paper 0.90: *reproduced*" in text
    assert "**0.50** [0.45, 0.55] (n=400) · paper 0.90: *not reproduced (below)*" in text
    assert "(n=4) · paper 0.50: *n too small*" in text and "not run · paper 0.90" in text
    assert "(n=10) |" in text  # no paper number: no verdict
    line = verdict_line(cells)
    assert "reproduced 1, not reproduced 1 (0 above, 1 below), undecided 1, n too small 1." in line
    assert verdict_line({"b": {"z": cells["b"]["z"]}}) == ""
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(200), np.ones(200)]
    auc = stats.bootstrap_auc(labels, labels + rng.normal(0, 1.0, 400))
    auc_text = cells_markdown({"d": {"fgsm": Cell(auc.value, 200, 0.9985, auc)}}, None)
    places = stats.decimals(auc)
    assert f"**{auc.value:.{places}f}** [{auc.low:.{places}f}," in auc_text and "paper 0.9985" in auc_text


def test_a_masking_flag_on_few_examples_reads_undecided():
    from jobs.paper_report import masking_lines

    flag = dict(defense="invgan", check="not_converged", attack="bpda_ce", compared_with="check/x2", acc=0.5)
    flags = {"checks": 9, "flagged": [flag | {"acc_other": 0.25, "n": 4}, flag | {"acc_other": 0.3, "n": 40}]}
    head, small, large = masking_lines(flags)
    assert head == "\nGradient-masking checks: 9 run, 2 flagged (1 on n < 20: undecided):"
    assert small.endswith("(n=4): *undecided* (n < 20)") and "bpda_ce 0.50 [0.15, 0.85]" in small
    assert large.endswith("(n=40)")


def test_the_deviations_list_is_read_from_the_config_and_the_weights(fixture_run):
    """Each protocol setting is read from the run's config (with the defaults it leaves out) or the weights
    manifest; only those that differ are listed; a path that names nothing stops the report naming it."""
    from jobs.paper_spec import Setting
    from jobs.protocol import deviations, resolve

    text = fixture_run[0].read_text()
    section = text[text.index("## Tiny table") : text.index("## Tiny AUC")]
    assert "**Deviations from the paper's protocol** (2 of the 4 settings it states" in section
    assert "- `defenses.invgan.params.optimizer`: ours **adam**; the paper **sgd** (eq. 6)" in section
    assert "- `weights.inverter.training.steps_done`: ours **5000**; the paper **100000**" in section
    assert "attacks.fgsm.params.eps" not in section and "`limit`" not in section  # the same as the paper's
    cfg = load_config(ROOT / "configs" / "smoke.yaml")
    config = cfg.model_dump(mode="json")
    assert resolve(config, "defenses.invgan.params.lr", cfg.weights_dir()) == 0.05  # the class's default
    assert resolve(config, "defenses.invgan.params.steps", cfg.weights_dir()) == 20  # the config's
    assert resolve(config, "attacks.bpda.base.params.abs_stepsize", cfg.weights_dir()) == 0.1
    assert resolve(config, "weights.generator.arch.latent_dim", cfg.weights_dir()) == 16
    with pytest.raises(KeyError):
        resolve(config, "defenses.invgan.params.optimiser", cfg.weights_dir())
    with pytest.raises(KeyError, match="'defenses.nope.params.steps' names nothing"):
        deviations({"defenses.nope.params.steps": Setting(paper=1)}, [(config, cfg.weights_dir())])


def test_the_curves_verdict_finds_the_fewest_iterations_that_reach_the_reference():
    from jobs.paper_report import _reaches

    table = pd.DataFrame(
        {
            "family": ["defensegan"] * 3 + ["invgan"] * 3,
            "effective_iterations": [10, 200, 2000, 1, 25, 200],
            "clean_accuracy": [0.5, 0.9, 0.95, 0.90, 0.951, 0.96],
            "attacked_accuracy": [0.3, 0.6, 0.7, 0.5, 0.6, 0.65],
        }
    )
    clean, attacked = _reaches(table, "invgan", "defensegan")
    assert "at **25 iterations = 0.0125** of them" in clean
    assert "never reaches defensegan's 0.700" in attacked and "best 0.650" in attacked


def test_curves_and_red_sections_from_run_folders(tmp_path):
    """A curves run (real worker rows) and a RED run (rows with known accuracies) become their sections."""
    from jobs.curves import curves_run_config
    from jobs.evaluate import EvalWorker
    from jobs.red import RedConfig
    from jobs.schemas import RED_ROWS

    raw = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text()) | {"name": "tiny_curves", "limit": 4}
    raw |= {"curves": {"budgets": [0, 4], "defenses": ["invgan", "defensegan"], "restarts": 2}}
    raw["attacks"] = {"fgsm": {"kind": "fgsm"}}
    (tmp_path / "curves.yaml").write_text(yaml.safe_dump(raw))
    point_cfg = curves_run_config(load_config(tmp_path / "curves.yaml"))
    rows = EvalWorker(point_cfg.model_dump(mode="json")).run_shard(0, 0, 4)
    write_shard(shard_path(tmp_path / "runs" / f"{point_cfg.name}-{point_cfg.config_hash()[:12]}", 0), rows)

    red_raw = yaml.safe_load((ROOT / "configs" / "red_smoke.yaml").read_text()) | {"name": "tiny_red"}
    (tmp_path / "red.yaml").write_text(yaml.safe_dump(red_raw))
    red = load_config(tmp_path / "red.yaml", model=RedConfig)
    # BSD-GAN: right on every signal, attack type right on linf only; CNN wrong on attacked inputs
    red_rows = pd.DataFrame(
        [
            {
                "example_id": k,
                "label": 3,
                "attack_type": t,
                "signal_pred": 3 if (m == "bsd_gan" or t == "clean") else 5,
                "attack_pred": 0 if m != "cnn" else -1,
                "method": m,
                "seconds": 0.1,
                "final_loss": 0.0,
                "shard": 0,
            }
            for k in range(4)
            for t in ("clean", "linf", "l2")
            for m in ("cnn", "bsd_gan")
        ]
    )
    write_shard(
        shard_path(tmp_path / "runs" / f"{red.name}-{red.config_hash()[:12]}", 0),
        red_rows.assign(node="n", worker="h:1"),
        RED_ROWS,
    )
    paper = {
        "curves": {
            "kind": "curves",
            "config": str(tmp_path / "curves.yaml"),
            "title": "Tiny Fig",
            "source": "-",
            "cheap": "invgan",
            "reference": "defensegan",
        },
        "red": {
            "kind": "red",
            "config": str(tmp_path / "red.yaml"),
            "title": "Tiny RED",
            "source": "-",
            "paper": {"signal_accuracy": {"bsd_gan": {"clean": 0.94}}},
        },
    }
    (tmp_path / "paper.yaml").write_text(yaml.safe_dump(paper))
    text = build_report(tmp_path / "docs", runs=tmp_path / "runs", paper_numbers=tmp_path / "paper.yaml").read_text()
    assert "| invgan | 4 |" in text and "| defensegan | 4 |" in text and "- clean: invgan" in text
    all4 = stats.wilson(4, 4)
    assert f"**1.000** [{all4.low:.3f}, 1.000] (n=4) · paper 0.940: *n too small*" in text  # bsd_gan clean signal
    none4 = stats.wilson(0, 4)
    assert (
        f"| cnn | **1.000** [{all4.low:.3f}, 1.000] (n=4) | **0.000** [0.000, {none4.high:.3f}] (n=4) | "
        f"**0.000** [0.000, {none4.high:.3f}] (n=4) |" in text
    )
    # attack type: linf is index 0 -> right
    assert f"| bsd_gan | **1.000** [{all4.low:.3f}, 1.000] (n=4) | **0.000** [0.000, {none4.high:.3f}] (n=4) |" in text
    assert (tmp_path / "docs" / "figures" / "curves.png").exists() and (
        tmp_path / "docs" / "figures" / "red.png"
    ).exists()


def test_accuracy_vs_distortion_counts_an_adversarial_only_within_the_budget():
    """Known answer: fooled at l2 1.0 and 2.5, one never fooled, one misclassified clean (l2 0)."""
    import numpy as np

    from jobs.paper_report import distortion_curve

    rows = pd.DataFrame({"correct": [False, False, True, False], "l2": [1.0, 2.5, 0.0, 0.0]})
    eps = np.array([0.0, 0.5, 1.0, 2.0, 3.0])
    assert distortion_curve(rows, eps).tolist() == [0.75, 0.75, 0.5, 0.5, 0.25]


def test_red_theory_section_reads_the_commands_numbers(tmp_path):
    import json

    folder = tmp_path / "runs" / "red-theory"
    folder.mkdir(parents=True)
    numbers = {"m": [30, 100], "mean_mu/leaky_relu": [0.5, 0.7], "mean_mu/softplus": [0.4, 0.6]}
    (folder / "theory.json").write_text(json.dumps(numbers | {"rate_m100": 0.9876, "attack_type_recovered": 1.0}))
    (tmp_path / "paper.yaml").write_text(yaml.safe_dump({"rt": {"kind": "red_theory", "title": "RT", "source": "-"}}))
    text = build_report(tmp_path / "docs", runs=tmp_path / "runs", paper_numbers=tmp_path / "paper.yaml").read_text()
    assert "| 100 | 0.7 | 0.6 |" in text and "mean rate 0.9876 per step" in text and "100% of the instances" in text


def test_distortion_section_from_the_fixture_run(fixture_run, tmp_path):
    import numpy as np

    from jobs.paper_report import distortion_curve

    out, rows = fixture_run
    runs = out.parent.parent / "runs"
    spec = {"kind": "distortion", "config": str(out.parent.parent / "tiny.yaml"), "title": "D", "source": "-"}
    (tmp_path / "paper.yaml").write_text(
        yaml.safe_dump({"d": spec | {"attacks": ["fgsm", "bpda"], "table_eps": [1.0]}})
    )
    text = build_report(tmp_path / "docs", runs=runs, paper_numbers=tmp_path / "paper.yaml").read_text()
    sub = rows[(rows.defense == "invgan") & (rows.attack == "bpda")]
    assert f"| invgan | bpda | 4 | {distortion_curve(sub, np.array([1.0]))[0]:.2f} |" in text
    assert (tmp_path / "docs" / "figures" / "d.png").exists()


def test_a_run_still_going_is_reported_as_partial(fixture_run, tmp_path):
    """A run with some shards written (still running, or stopped) is reported with its finished shards only,
    and says so above the table."""
    _, rows = fixture_run
    raw = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text()) | {"name": "partial", "limit": 8}
    (tmp_path / "partial.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(tmp_path / "partial.yaml")
    write_shard(shard_path(tmp_path / "runs" / f"{cfg.name}-{cfg.config_hash()[:12]}", 0), rows)
    spec = {"config": str(tmp_path / "partial.yaml"), "title": "P", "source": "-", "columns": {"clean": ["clean"]}}
    (tmp_path / "paper.yaml").write_text(yaml.safe_dump({"p": spec}))
    text = build_report(tmp_path / "docs", runs=tmp_path / "runs", paper_numbers=tmp_path / "paper.yaml").read_text()
    assert "**Partial run: 1 of 2 shards of `" in text and "(n=4)" in text


def test_the_headline_table_replaces_the_readme_block_between_its_markers_only(fixture_run):
    from jobs.paper_report import HEADLINE_END, HEADLINE_START

    out, _ = fixture_run
    tmp = out.parent.parent
    paper = yaml.safe_load((tmp / "paper.yaml").read_text())
    paper["tiny_accuracy"]["headline"] = True
    (tmp / "headline.yaml").write_text(yaml.safe_dump(paper, allow_unicode=True, sort_keys=False))
    readme = tmp / "README.md"
    readme.write_text(f"# project\n\nintro\n\n{HEADLINE_START}\nstale numbers\n{HEADLINE_END}\n\n## after\n")
    plain = tmp / "PLAIN.md"
    plain.write_text("# no markers\n")
    for target in (readme, plain):
        build_report(tmp / "docs2", runs=tmp / "runs", paper_numbers=tmp / "headline.yaml", readme=target)
    text = readme.read_text()
    block = text[text.index(HEADLINE_START) : text.index(HEADLINE_END)]
    assert text.startswith("# project\n\nintro\n\n") and text.endswith(f"{HEADLINE_END}\n\n## after\n")
    assert "stale numbers" not in text and "### Tiny table" in block and "(n=" in block
    assert "## Tiny AUC" not in text and "docs/results.md#tiny_accuracy" in block
    assert plain.read_text() == "# no markers\n"
    once = readme.read_text()
    build_report(tmp / "docs2", runs=tmp / "runs", paper_numbers=tmp / "headline.yaml", readme=readme)
    assert readme.read_text() == once  # regenerating is idempotent


def test_a_run_made_with_another_data_dir_is_found_and_a_different_config_is_not(tmp_path):
    """`--set data_dir=...` (the same data at another path) changes the run folder's hash; the report still
    finds that run by its recorded config, but never a run of another limit, attack or defense."""
    from jobs.paper_report import find_run_dir

    cfg = load_config(ROOT / "configs" / "smoke.yaml")
    elsewhere = load_config(ROOT / "configs" / "smoke.yaml", data_dir="/data/elsewhere")
    other = load_config(ROOT / "configs" / "smoke.yaml", limit=8, data_dir="/data/elsewhere")
    for c in (elsewhere, other):
        folder = tmp_path / f"{c.name}-{c.config_hash()[:12]}"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"config": c.model_dump(mode="json")}))
    assert find_run_dir(cfg, tmp_path).name == f"smoke-{elsewhere.config_hash()[:12]}"
    limited = load_config(ROOT / "configs" / "smoke.yaml", limit=12)
    assert find_run_dir(limited, tmp_path) == tmp_path / f"smoke-{limited.config_hash()[:12]}"  # none matches


def test_a_second_runs_attacks_join_the_table_with_their_convergence_curve(fixture_run, tmp_path):
    """`also`: another config's run on the same examples adds its attacks (its clean rows do not replace the
    first run's); `convergence`: accuracy after k steps of a first-success attack, whose last point is the
    attack's own cell, and a figure; its first 5 steps repeat the 5-step `bpda` of the first run (same
    spec but the steps), which the report checks per example, and a changed step is caught."""
    out, rows = fixture_run
    tmp = out.parent.parent
    raw = yaml.safe_load((tmp / "tiny.yaml").read_text())
    more = raw | {
        "name": "tiny_more",
        "attacks": {
            "bpda8": raw["attacks"]["bpda"]
            | {"base": {"kind": "pgd_linf", "params": {"eps": 0.3, "steps": 8, "abs_stepsize": 0.1}}}
        },
    }
    (tmp / "more.yaml").write_text(yaml.safe_dump(more, sort_keys=False))
    cfg = load_config(tmp / "more.yaml")
    more_rows = EvalWorker(cfg.model_dump(mode="json")).run_shard(0, 0, 4)
    write_shard(shard_path(tmp / "runs" / f"{cfg.name}-{cfg.config_hash()[:12]}", 0), more_rows)
    paper = {
        "joined": {
            "config": str(tmp / "tiny.yaml"),
            "also": [str(tmp / "more.yaml")],
            "convergence": "bpda8",
            "title": "Joined",
            "source": "-",
            "columns": {"clean": ["clean"], "bpda8": ["bpda8"], "bpdas": ["bpda", "bpda8"], "worst": ["fgsm", "bpda8"]},
        }
    }
    (tmp_path / "paper.yaml").write_text(yaml.safe_dump(paper, sort_keys=False))
    text = build_report(tmp_path / "docs", runs=tmp / "runs", paper_numbers=tmp_path / "paper.yaml").read_text()
    assert "Config: `" in text and "more.yaml`" in text and text.count("Run `tiny_") == 2
    both = pd.concat([rows, more_rows[more_rows.attack != "clean"]])
    for d in ("none", "invgan"):
        dr = both[both.defense == d]
        bpda8 = dr[dr.attack == "bpda8"]["correct"].mean()
        worst = combined_correct(dr, ["fgsm", "bpda8"]).mean()
        line = next(line for line in text.splitlines() if line.startswith(f"| {d} | **"))
        i, j = stats.wilson(round(bpda8 * 4), 4), stats.wilson(round(worst * 4), 4)
        assert f"**{bpda8:.2f}** [{i.low:.2f}, {i.high:.2f}] (n=4)" in line
        assert line.rstrip(" |").endswith(f"**{worst:.2f}** [{j.low:.2f}, {j.high:.2f}] (n=4)")
        curve = next(line for line in text.splitlines() if line.startswith(f"| {d} | 4 | "))
        assert curve.rstrip(" |").endswith(f"{bpda8:.2f}")  # k = 8: the attack's own cell
    assert "**Convergence of `bpda8`**" in text and "k=0 | k=1 | k=2 | k=5 | k=8 |" in text
    assert (tmp_path / "docs" / "figures" / "joined_convergence.png").read_bytes()[:4] == b"\x89PNG"
    assert (
        "Its first 5 steps are `bpda` (same spec but the steps): on the 8 (defense, example) pairs both ran, it "
        "repeats it exactly" in text
    )
    for d in ("none", "invgan"):  # the two-attack column with bpda8 cut to k = 2 (half its steps), then in full
        short, long = (
            both[(both.defense == d) & (both.attack == a)].set_index("example_id") for a in ("bpda", "bpda8")
        )
        late = long.correct.astype(bool) | (long.queries > 3)
        at_2, full = ((short.correct.astype(bool) & c).mean() for c in (late, long.correct.astype(bool)))
        assert f"{d} {at_2:.2f} → {full:.2f}" in next(
            line for line in text.splitlines() if line.startswith("Column `bpdas`")
        )
    moved = both.reset_index(drop=True)
    fell = moved.index[(moved.attack == "bpda") & ~moved.correct.astype(bool)]
    assert len(fell), "the check needs an example bpda fooled"
    moved.loc[fell[0], "queries"] += 1  # as if the short run had fooled it one step later
    assert "**differs on 1**" in prefix_agreement(moved, "bpda8", "bpda", 5)


def test_the_readme_headline_wraps_prose_but_not_tables():
    from jobs.paper_report import wrap_paragraphs

    prose, row = " ".join(["word"] * 100), "| " + " | ".join(["cell"] * 60) + " |"
    out = wrap_paragraphs(f"{prose}\n\n{row}\n![figure](docs/figures/{'x' * 200}.png)")
    lines = out.split("\n")
    assert max(len(line) for line in lines[:-3]) <= 120 and " ".join(lines[:-3]) == prose
    assert lines[-2:] == [row, f"![figure](docs/figures/{'x' * 200}.png)"]


def test_a_repro_runs_description_names_the_tables_it_feeds():
    from jobs.paper_spec import tables_fed_by

    fed = tables_fed_by("repro_table2_mnist")
    assert any("#table2_mnist)" in f for f in fed) and any("#table3_mnist)" in f for f in fed)
    assert any("#table2_mnist)" in f for f in tables_fed_by("repro_table2_mnist_bpda500"))  # through `also`
    assert tables_fed_by("smoke") == []


def test_every_protocol_setting_of_the_shipped_paper_numbers_names_a_real_setting():
    """Each `protocol:` path resolves in its table's configs or weights (a typo would silently read as "no
    deviation" otherwise), and the known deviations issue #22 lists are among those found."""
    from jobs.paper_report import deviations_text
    from jobs.paper_spec import PAPER_NUMBERS, ConfigTable, load_paper_numbers

    found = {}
    for key, spec in load_paper_numbers(PAPER_NUMBERS).items():
        if isinstance(spec, ConfigTable) and spec.protocol:
            found[key] = deviations_text(spec, ROOT / "runs")
    assert {"table2_mnist", "red_table1_mnist", "recovery_digits", "chen_fig1_mnist", "table5_mnist"} <= set(found)
    assert "optimizer" not in found["table2_mnist"]  # the papers' protocol: gradient descent (issue #22)
    assert "`defenses.invgan.params.optimizer`: ours **adam**; the paper **sgd**" in found["table2_mnist_adam"]
    assert "`weights.inverter.training.steps_done`: ours **8000**" in found["table2_mnist"]
    assert "`dictionary.normalize_atoms`: ours **True**; the paper **False**" in found["red_table1_mnist"]
    assert "`attacks.nes.target`: ours **invgan**" in found["chen_fig1_mnist"]
    assert "`dataset`: ours **mnist**; the paper **cifar10**" in found["table5_mnist"]
