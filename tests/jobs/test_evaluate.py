"""`invgan eval` end to end: a real Ray instance (shared by the module), real Parquet, real MLflow."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from jobs.config import load_config
from jobs.evaluate import evaluate, expected_rows
from jobs.schemas import EVAL_ROWS, WHERE_COLUMNS
from jobs.sharded import JobOptions

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "smoke.yaml"
KEY = ["example_id", "attack", "defense"]


@pytest.fixture(scope="module")
def ray_instance():
    import ray

    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)  # 2 actors + 1 CPU for Ray Data
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def smoke_run(ray_instance, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smoke")
    cfg = load_config(SMOKE, mlflow={"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"})
    return cfg, evaluate(cfg, JobOptions(out=tmp / "run", progress=False)), tmp


def test_rows_have_the_schema_and_one_row_per_example_attack_defense(smoke_run):
    cfg, res, _ = smoke_run
    rows = res.rows
    assert list(rows.columns) == EVAL_ROWS.columns + list(WHERE_COLUMNS)  # + node and worker: where each shard ran
    assert rows.node.str.len().min() > 0 and rows.worker.str.contains(":").all()
    assert not rows.duplicated(KEY).any()
    n = 16
    assert len(rows) == expected_rows(cfg, 0, n, n) == n * len(cfg.defenses) * (1 + len(cfg.attacks))
    assert set(rows.attack) == {"clean", *cfg.attacks} and set(rows.defense) == set(cfg.defenses)
    assert rows.loc[rows.attack == "fgsm", "linf"].max() <= 0.3 + 1e-6
    assert (rows.attacked == (rows.attack != "clean")).all()
    assert rows.loc[rows.defense == "none", "detection_score"].isna().all()
    assert rows.loc[rows.defense == "invgan", "detection_score"].notna().all()
    assert len(list((res.run_dir / "rows").glob("shard-*.parquet"))) == 4  # 16 examples / shard_size 4


def test_summary_has_accuracy_auc_and_worst_case(smoke_run):
    cfg, res, _ = smoke_run
    summary = json.loads((res.run_dir / "summary.json").read_text())
    acc = summary["accuracy"]
    rows = res.rows
    for d in cfg.defenses:
        for a in ("clean", *cfg.attacks):
            expected = rows[(rows.defense == d) & (rows.attack == a)].correct.mean()
            assert acc[d][a] == pytest.approx(expected)
        assert acc[d]["worst_case"] <= min(acc[d][a] for a in cfg.attacks)
    assert 0 <= summary["auc"]["invgan"]["fgsm"] <= 1
    assert summary["mlflow_run_id"] == res.mlflow_run_id


def test_one_worker_and_other_shards_give_the_same_predictions(smoke_run, tmp_path):
    """1 worker and shards of 16 (one batch) vs 2 workers and shards of 4: rows must not depend on either."""
    cfg, res, _ = smoke_run
    one = load_config(SMOKE, ["shard_size=16"], resources={"num_workers": 1, "num_cpus_per_worker": 1})
    single = evaluate(one, JobOptions(out=tmp_path / "one", progress=False, log_mlflow=False))
    a = res.rows.sort_values(KEY).reset_index(drop=True)
    b = single.rows.sort_values(KEY).reset_index(drop=True)
    pd.testing.assert_series_equal(a.prediction, b.prediction)
    pd.testing.assert_series_equal(a.l2, b.l2, atol=1e-5)


@pytest.mark.reliability(kind="fault")
def test_rerun_computes_only_missing_shards(smoke_run, tmp_path):
    cfg, res, _ = smoke_run
    run_dir = tmp_path / "resume"
    (run_dir / "rows").mkdir(parents=True)
    for f in sorted((res.run_dir / "rows").glob("shard-*.parquet"))[:3]:  # as if killed after 3 shards
        (run_dir / "rows" / f.name).write_bytes(f.read_bytes())
    (run_dir / "config.json").write_bytes((res.run_dir / "config.json").read_bytes())
    again = evaluate(cfg, JobOptions(out=run_dir, progress=False, log_mlflow=False))
    assert (again.computed_shards, again.skipped_shards) == (1, 3)
    assert not again.rows.duplicated(KEY).any() and len(again.rows) == len(res.rows)

    # a shard file damaged on disk (truncated) before a resume: moved aside, recomputed, the rows as before
    shard = run_dir / "rows" / "shard-00001.parquet"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    fixed = evaluate(cfg, JobOptions(out=run_dir, progress=False, log_mlflow=False))
    assert (fixed.computed_shards, fixed.skipped_shards) == (1, 3)
    assert len(list((run_dir / "damaged").glob("shard-00001.parquet.*"))) == 1
    key = ["example_id", "attack", "defense"]
    pd.testing.assert_series_equal(
        fixed.rows.sort_values(key).prediction.reset_index(drop=True),
        again.rows.sort_values(key).prediction.reset_index(drop=True),
    )


def test_a_run_folder_of_another_config_is_refused(smoke_run):
    cfg, res, _ = smoke_run
    other = load_config(SMOKE, ["attacks.fgsm.params.eps=0.1"])
    with pytest.raises(SystemExit, match="different config"):
        evaluate(other, JobOptions(out=res.run_dir, progress=False, log_mlflow=False))


def test_mlflow_run_holds_metrics_tables_and_figures(smoke_run):
    from mlflow.tracking import MlflowClient

    cfg, res, tmp = smoke_run
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    run = client.get_run(res.mlflow_run_id)
    assert run.data.metrics["accuracy/invgan/clean"] == pytest.approx(res.summary["accuracy"]["invgan"]["clean"])
    assert "auc/invgan/fgsm" in run.data.metrics
    assert run.data.tags["dataset"] == "digits" and run.info.run_name.startswith("smoke-")
    artifacts = {a.path for a in client.list_artifacts(res.mlflow_run_id, "tables")} | {
        a.path for a in client.list_artifacts(res.mlflow_run_id, "figures")
    }
    assert {"tables/accuracy.json", "figures/roc.png", "figures/images.png"} <= artifacts
    note = run.data.tags["mlflow.note.content"]
    assert re.search(r"\| none +\| ", note) and "(n=16)" in note  # the accuracy table, readable in the UI
    # the examples evaluated, as the run's dataset: the split's digest, one row per evaluated id
    from invgan_core.data import load_dataset
    from jobs.tracking import split_digest

    (logged,) = run.inputs.dataset_inputs
    assert logged.dataset.name == "digits/test" and json.loads(logged.dataset.profile)["num_rows"] == 16
    assert logged.dataset.digest == split_digest(load_dataset("digits", "test"))


def test_reruns_keep_and_continue_the_mlflow_run(smoke_run):
    cfg, res, _ = smoke_run
    quiet = evaluate(cfg, JobOptions(out=res.run_dir, progress=False, log_mlflow=False))  # all shards reused
    assert quiet.computed_shards == 0 and quiet.mlflow_run_id == res.mlflow_run_id
    again = evaluate(cfg, JobOptions(out=res.run_dir, progress=False))
    assert again.mlflow_run_id == res.mlflow_run_id


@pytest.mark.reliability(kind="fault")
def test_killed_job_resumes_without_recomputing(tmp_path):
    """A real kill: SIGKILL the CLI after its first shard file, rerun, check nothing is lost or repeated."""
    env = os.environ | {"INVGAN_RUNS": str(tmp_path / "runs"), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "invgan",
        "eval",
        "--config",
        str(SMOKE),
        "--out",
        str(tmp_path / "run"),
        "--no-mlflow",
        "--set",
        "shard_size=2",
        "--set",
        "resources.num_workers=1",
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    rows_dir, deadline = tmp_path / "run" / "rows", time.monotonic() + 180
    while time.monotonic() < deadline and len(list(rows_dir.glob("shard-*.parquet"))) < 2:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
    proc.wait()
    done = len(list(rows_dir.glob("shard-*.parquet")))
    assert 2 <= done < 8
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"{8 - done} computed, {done} reused" in out.stdout
    rows = pd.concat(pd.read_parquet(f) for f in rows_dir.glob("shard-*.parquet"))
    assert len(rows) == 16 * 2 * 3 and not rows.duplicated(KEY).any()


def test_curves_evaluate_every_budget_and_log_steps(ray_instance, tmp_path):
    from mlflow.tracking import MlflowClient

    from jobs.curves import point_defenses, run_curves

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(
        ROOT / "configs" / "curves.yaml",
        ["dataset=digits", "weights=weights/digits", "limit=8", "shard_size=8", "curves.budgets=[0,20,100]"],
        mlflow={"tracking_uri": uri},
    )
    assert list(point_defenses(cfg)) == [
        "invgan_T0",
        "defensegan_10x0",
        "invgan_T20",
        "defensegan_10x2",
        "invgan_T100",
        "defensegan_10x10",
    ]
    res = run_curves(cfg, JobOptions(out=tmp_path / "run", progress=False))
    table, run_dir, run_id = pd.DataFrame(res.summary["curves"]), res.run_dir, res.mlflow_run_id
    assert table.groupby("family").effective_iterations.apply(list).to_dict() == {
        "defensegan": [0, 20, 100],
        "invgan": [1, 20, 100],
    }
    assert (table.n == 8).all() and (run_dir / "curves.png").exists()
    # more projection steps fit the clean images better: InvGAN at T=100 at least as accurate as T=0 here
    inv = table[table.family == "invgan"].set_index("effective_iterations")
    assert inv.loc[100, "clean_accuracy"] >= inv.loc[1, "clean_accuracy"]
    history = MlflowClient(uri).get_metric_history(run_id, "curve/invgan/clean_accuracy")
    assert sorted(m.step for m in history) == [1, 20, 100]


# ---------------------------------------------------------------- in-process: the worker's rows (no Ray)


def _all_rows(worker, n: int, shard_size: int) -> pd.DataFrame:
    from jobs.run_folder import plan_shards

    return pd.concat([worker.run_shard(*s) for s in plan_shards(n, shard_size)], ignore_index=True)


def test_an_attack_limit_takes_the_same_spread_examples_whatever_the_shard_size():
    """`limit` picks examples spread over the split (not the first ones), by position in the split only."""
    from jobs.config import attacked_positions, examples_in_shard
    from jobs.evaluate import EvalWorker

    cfg = load_config(SMOKE, ["limit=16", "attacks.bpda.limit=5", "defenses={none: {kind: none}}"])
    worker = EvalWorker(cfg.model_dump(mode="json"))
    attacked = {}
    for size in (1, 7, 16):
        rows = _all_rows(worker, 16, size)
        assert len(rows) == sum(expected_rows(cfg, a, min(a + size, 16), 16) for a in range(0, 16, size))
        attacked[size] = sorted(rows.loc[rows.attack == "bpda", "example_id"])
    assert attacked[1] == attacked[7] == attacked[16] and len(attacked[1]) == 5
    by_shard = [len(examples_in_shard(cfg.attacks["bpda"], a, a + 4, 16)) for a in range(0, 16, 4)]
    assert by_shard == [2, 1, 1, 1]  # every shard of 4 gets its share, not 4 + 1 in the first two
    # the default config: BPDA's 10 of 60 examples over 6 shards, CW's 30 likewise
    default = load_config(ROOT / "configs" / "default.yaml")
    for name, share in (("bpda", 10 / 6), ("cw", 30 / 6)):
        counts = [len(examples_in_shard(default.attacks[name], a, a + 10, 60)) for a in range(0, 60, 10)]
        assert sum(counts) == default.attacks[name].limit and max(counts) - min(counts) <= 2
        assert all(abs(c - share) <= 1 for c in counts), (name, counts)
    assert set(attacked_positions(3, 60)) <= set(attacked_positions(10, 60)) <= set(attacked_positions(30, 60))


def test_the_target_defense_row_reuses_the_attack_projection_and_equals_a_fresh_one(monkeypatch):
    """The success check of an attack through a defense already purified x_adv: that defense's row takes it
    (one projection less per attack and target) and holds the same values as projecting again."""
    import jobs.evaluate as evaluate_module
    from jobs.evaluate import EvalWorker

    cfg = load_config(SMOKE, ["limit=4"])
    worker = EvalWorker(cfg.model_dump(mode="json"))
    calls = {"n": 0}
    for defense in worker.defenses.values():
        real = defense.purify

        def counting(x, ids=None, real=real):
            calls["n"] += 1
            return real(x, ids)

        defense.purify = counting
    reused = worker.run_shard(0, 0, 4)
    with_reuse = calls["n"]
    real_attack = evaluate_module._attack

    def without_purified(*args):
        result, secs = real_attack(*args)
        result.purified = None
        return result, secs

    monkeypatch.setattr(evaluate_module, "_attack", without_purified)
    calls["n"] = 0
    fresh = worker.run_shard(0, 0, 4)
    assert calls["n"] - with_reuse == len(cfg.defenses)  # bpda (target: each) x 2 defenses: projections saved
    timing = ["seconds", "attack_seconds"]
    pd.testing.assert_frame_equal(reused.drop(columns=timing), fresh.drop(columns=timing))
    assert (reused.seconds > 0).all()  # a reused row reports the projection's seconds from the attack


def test_expected_rows_of_all_shards_add_up_to_every_attack_limit():
    cfg = load_config(ROOT / "configs" / "default.yaml")
    n, d = 60, len(cfg.defenses)
    total = sum(expected_rows(cfg, a, min(a + 7, n), n) for a in range(0, n, 7))
    assert total == d * (n + sum(min(s.limit or n, n) for s in cfg.attacks.values()))


def test_a_defense_may_use_its_own_inverter_the_ablation_of_table_5(tmp_path):
    """`defenses.<name>.inverter` swaps in another inverter (InvGAN Table 5: without L_adv): the same file as the
    folder's gives the same rows; a changed one changes InvGAN at T = 0 (the inverter alone) and nothing else;
    a kind without an inverter, or a latent size the generator does not take, is refused before any work."""
    import torch

    from invgan_core.checkpoint import CheckpointError, load_model, save_model
    from invgan_core.models import build_model
    from jobs.evaluate import EvalWorker
    from jobs.models import check_job_inputs

    stem = ROOT / "weights" / "digits" / "inverter"
    inverter, manifest = load_model(stem, kind="inverter")
    with torch.no_grad():
        inverter.head.weight.mul_(0.5)  # a different (worse) inverter of the same architecture
    save_model(tmp_path / "inverter", inverter, kind="inverter", arch=manifest["arch"])
    t0 = {"kind": "invgan", "params": {"steps": 0}}
    defenses = {"none": {"kind": "none"}, "folder": t0, "same": t0 | {"inverter": str(stem)}}
    defenses["changed"] = t0 | {"inverter": str(tmp_path / "inverter")}
    cfg = load_config(SMOKE, ["limit=8", f"defenses={json.dumps(defenses)}", "attacks={fgsm: {kind: fgsm}}"])
    rows = EvalWorker(cfg.model_dump(mode="json")).run_shard(0, 0, 8).set_index(["example_id", "attack"])
    by = {d: rows[rows.defense == d][["prediction", "detection_score"]] for d in ("folder", "same", "changed")}
    pd.testing.assert_frame_equal(by["folder"], by["same"])
    assert not by["folder"]["detection_score"].equals(by["changed"]["detection_score"])

    with pytest.raises(ValueError, match="has no inverter"):
        load_config(SMOKE, ["defenses={d: {kind: defensegan, inverter: weights/digits/inverter}}"])
    arch = manifest["arch"] | {"latent_dim": manifest["arch"]["latent_dim"] + 1}
    wrong = build_model("inverter", arch)
    save_model(tmp_path / "wrong" / "inverter", wrong, kind="inverter", arch=arch)
    bad = load_config(SMOKE, [f"defenses={{d: {{kind: invgan, inverter: {tmp_path / 'wrong' / 'inverter'}}}}}"])
    with pytest.raises(CheckpointError, match="latent size"):
        check_job_inputs(bad, None)


@pytest.mark.skipif(not os.environ.get("RUN_SLOW"), reason="60 s of substitute training: set RUN_SLOW=1")
def test_the_substitute_black_box_is_trained_once_per_oracle_on_unevaluated_seeds_and_transfers(ray_instance, tmp_path):
    """InvGAN Table 4's attack in `invgan eval`: one substitute per oracle (the classifier, or `each` defense),
    trained on the driver from the split's last `seeds` images, saved in the run folder, reused on resume."""
    from invgan_core.checkpoint import read_manifest
    from invgan_core.data import load_dataset

    attacks = {
        "sub": {"kind": "substitute", "params": {"rounds": 3, "epochs": 10}},
        "sub_each": {"kind": "substitute", "target": "each", "params": {"rounds": 2, "epochs": 3, "seeds": 50}},
    }
    cfg = load_config(SMOKE, attacks=attacks)
    res = evaluate(cfg, JobOptions(out=tmp_path / "run", progress=False, log_mlflow=False))
    folder = res.run_dir / "substitutes"
    made = {p.stem for p in folder.glob("*.json")}
    assert made == {"sub-classifier", "sub_each-none", "sub_each-invgan"}
    test = load_dataset("digits", "test")
    manifest = read_manifest(folder / "sub-classifier")
    assert manifest["oracle_queries"] == 150 * (1 + 2 + 4)
    assert manifest["seed_ids"] == [int(test.ids[-150]), int(test.ids[-1])]  # the last 150: never evaluated
    assert read_manifest(folder / "sub_each-invgan")["oracle_queries"] == 50 * (1 + 2)
    rows = res.rows
    for name, per_defense in (("sub", 16), ("sub_each", 16)):
        for d in cfg.defenses:
            assert len(rows[(rows.attack == name) & (rows.defense == d)]) == per_defense
    assert (rows.loc[rows.attack == "sub", "queries"] == 1050).all()
    assert (rows.loc[rows.attack == "sub", "linf"] <= 0.3 + 1e-6).all()
    clean = rows[(rows.attack == "clean") & (rows.defense == "none")].correct.mean()
    assert rows[(rows.attack == "sub") & (rows.defense == "none")].correct.mean() <= clean - 0.2  # it transfers

    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    (res.run_dir / "rows" / "shard-00001.parquet").unlink()
    again = evaluate(cfg, JobOptions(out=tmp_path / "run", progress=False, log_mlflow=False))
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps  # not trained again
    a, b = (r.sort_values(KEY).reset_index(drop=True) for r in (rows, again.rows))
    pd.testing.assert_series_equal(a.prediction, b.prediction)

    with pytest.raises(ValueError, match=r"attacks.sub: the substitute's 150 seed images .* set limit <= 210"):
        evaluate(
            load_config(SMOKE, attacks=attacks, limit=300),
            JobOptions(out=tmp_path / "bad", progress=False, log_mlflow=False),
        )
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(("config", "stop"), [("smoke.yaml", 4), ("default.yaml", 2)])
def test_fused_projections_give_every_example_the_same_prediction_and_step(config, stop):
    """A shard's attacks and defenses side by side, every projection step through G in one batch
    (`resources.fused`, the default), against one after the other: the same rows, bit for bit (predictions,
    the step each example is fooled at, distortions, detection scores), since a row's pass through G does not
    depend on its batch (inversion.CPU_BLOCK). The default config on a 2-example shard: every one of its
    attacks and defenses."""
    from jobs.evaluate import EvalWorker

    rows = {}
    for fused in (True, False):
        cfg = load_config(ROOT / "configs" / config, [f"resources.fused={str(fused).lower()}"])
        rows[fused] = EvalWorker(cfg.model_dump(mode="json")).run_shard(0, 0, stop)
    assert set(rows[True]["attack"]) == {"clean", *cfg.attacks}  # every attack has examples in the shard
    timing = ["seconds", "attack_seconds"]
    pd.testing.assert_frame_equal(rows[True].drop(columns=timing), rows[False].drop(columns=timing))
    assert (rows[True]["seconds"] + rows[True]["attack_seconds"]).sum() > 0


def test_precision_adds_spread_examples_until_cells_are_narrow_or_the_budget_is_spent(ray_instance, tmp_path):
    """`precision:` after the configured examples: nothing added when the budget is already spent; a rerun with
    a larger budget continues the same run folder with rounds of added examples (each attack's next ones in its
    spread order, no example twice) until every cell's 95 % interval is within the target."""
    from jobs.config import attacked_positions
    from jobs.stats import wilson

    def run(budget):
        cfg = load_config(
            SMOKE,
            ["limit=48", "attacks.fgsm.limit=6", "attacks.bpda.limit=6"],
            precision={"half_width": 0.15, "budget_core_hours": budget},
            mlflow={"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        )
        return cfg, evaluate(cfg, JobOptions(out=tmp_path / "run", progress=False))

    cfg, first = run(1e-7)
    p = first.summary["precision"]
    assert p["stopped"] == "the budget is spent" and p["rounds"] == []
    assert {v["n"] for v in p["cells"].values()} == {6} and not any(v["reached"] for v in p["cells"].values())
    cfg, second = run(1.0)  # same config hash: the same folder, continued
    assert second.run_dir == first.run_dir and second.skipped_shards == first.computed_shards
    p = second.summary["precision"]
    assert p["rounds"] and all(v["reached"] or v["n"] == 48 for v in p["cells"].values()), p
    assert p["stopped"] in ("every cell reached the target", "the split is used up")
    rows, n = second.rows, 48
    assert not rows.duplicated(KEY).any()
    clean_ids = rows[rows["attack"] == "clean"].drop_duplicates("example_id")["example_id"].tolist()
    for attack in ("fgsm", "bpda"):
        final = p["rounds"][-1]["limits"][attack]
        got = set(rows[rows["attack"] == attack]["example_id"])
        assert got == {clean_ids[i] for i in attacked_positions(final, n)}  # the spread order, nested
        for d in cfg.defenses:
            cell = rows[(rows["attack"] == attack) & (rows["defense"] == d) & ~rows["diverged"]]
            assert wilson(int(cell["correct"].sum()), len(cell)).half_width <= 0.15 or final == n
