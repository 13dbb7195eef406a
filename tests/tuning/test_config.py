"""Search configs fail before any trial, naming the field; the validation split is carved from train, never test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from invgan_core.data import FORBIDDEN_SPLITS_ENV, DataError, load_dataset
from tuning.config import TuneSearch, load_search

ROOT = Path(__file__).resolve().parents[2]
SMOKE = yaml.safe_load((ROOT / "configs" / "tune" / "smoke.yaml").read_text())


def _with(**changes) -> dict:
    raw = yaml.safe_load(yaml.safe_dump(SMOKE))
    for key, value in changes.items():
        raw[key] = value
    return raw


@pytest.mark.parametrize(
    "space, named",
    [
        ({"defenses.invgan.params.lr": {"uniform": {"low": 0.2, "high": 0.01}}}, "defenses.invgan.params.lr"),
        ({"defenses.invgan.params.lr": {"loguniform": {"low": 0.0, "high": 0.1}}}, "defenses.invgan.params.lr"),
        ({"defenses.invgan.params.steps": {"randint": {"low": -5, "high": 10}}}, "space.defenses.invgan.params.steps"),
        ({"defenses.invgan.params.steps": {"randint": {"low": 10, "high": 5}}}, "defenses.invgan.params.steps"),
        ({"defenses.invgan.params.steps": {"choice": [10, 2.5]}}, "space.defenses.invgan.params.steps"),
        ({"defenses.invgn.params.steps": {"randint": {"low": 0, "high": 5}}}, "space.defenses.invgn.params.steps"),
        ({"defenses.invgan.params.stepz": {"randint": {"low": 0, "high": 5}}}, "space.defenses.invgan.params.stepz"),
        ({"defenses.invgan.params.optimizer": {"choice": ["adam", "adamw"]}}, "space.defenses.invgan.params.optimizer"),
        ({"seeds": {"choice": [0, 1]}}, "space.seeds"),
        ({"defenses.invgan.params.lr": {"normal": {"mean": 0.1}}}, "defenses.invgan.params.lr"),
        ({"defenses.invgan.params.lr": {"choice": []}}, "defenses.invgan.params.lr"),
    ],
)
def test_invalid_spaces_fail_naming_the_field(space, named):
    with pytest.raises(ValueError) as err:
        TuneSearch.model_validate(_with(space=space))
    assert named in str(err.value), str(err.value)


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"objective": {"metric": "accuracy", "defense": "invgan", "attack": "pgd"}}, "objective.attack"),
        ({"objective": {"metric": "accuracy", "defense": "defensegan"}}, "objective.defense"),
        ({"objective": {"metric": "t0_accuracy", "defense": "invgan"}}, "objective.metric"),
        ({"search": {"num_samples": 0}}, "search.num_samples"),
        (
            {"search": {"algorithm": "optuna"}, "space": {"defenses.invgan.params.steps": {"grid": [1, 2]}}},
            "space.defenses.invgan.params.steps",
        ),
        (
            {
                "kind": "inverter",
                "objective": {"metric": "t0_accuracy"},
                "space": {"lambda_adverse": {"uniform": {"low": 0, "high": 1}}},
            },
            "space.lambda_adverse",
        ),
        (
            {
                "kind": "inverter",
                "objective": {"metric": "t0_accuracy"},
                "space": {"eta": {"uniform": {"low": -1, "high": 1}}},
            },
            "space.eta",
        ),
        ({"name": "../../elsewhere"}, "name"),  # it names runs/tune/<name>: must not lead out of it
    ],
)
def test_invalid_searches_fail_naming_the_field(changes, named):
    with pytest.raises(ValueError) as err:
        TuneSearch.model_validate(_with(**changes))
    assert named in str(err.value), str(err.value)


def test_red_space_checked_against_the_red_config():
    raw = {
        "name": "r",
        "kind": "red",
        "base": "configs/red_smoke.yaml",
        "objective": {"metric": "attack_accuracy"},
        "space": {"steps": {"randint": {"low": -10, "high": 100}}},
    }
    with pytest.raises(ValueError, match=r"space\.steps"):
        TuneSearch.model_validate(raw)
    raw["space"] = {"lam_multiplier": {"uniform": {"low": 0.1, "high": 0.7}}}
    assert TuneSearch.model_validate(raw).base_point() == {"lam_multiplier": 0.35}


def test_invalid_search_stops_the_command_before_ray_starts(tmp_path):
    import ray

    from tuning.search import main

    bad = _with(space={"defenses.invgan.params.steps": {"randint": {"low": -1, "high": 3}}})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(SystemExit) as err:
        main(path, [], tmp_path / "out", None, None, None, False, False)
    assert "space.defenses.invgan.params.steps" in str(err.value)
    assert not ray.is_initialized() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "tune").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_search_configs_validate(path):
    search = load_search(path)
    assert search.space and search.objective.mode in ("min", "max")


def test_trials_overrides_do_not_leak_into_the_base():
    search = load_search(ROOT / "configs" / "tune" / "invgan_defense.yaml")
    assert search.base_point() == {
        "defenses.invgan.params.steps": 200,
        "defenses.invgan.params.lr": 0.05,
        "defenses.invgan.params.optimizer": "adam",
    }


# ---------------------------------------------------------------- the validation split


@pytest.mark.parametrize("name", ["digits", "mnist5k"])
def test_validation_split_is_carved_from_train_stratified_fixed_and_disjoint_from_test(name):
    train, test = load_dataset(name, "train"), load_dataset(name, "test")
    val, fit = load_dataset(name, "validation"), load_dataset(name, "fit")
    assert set(val.ids) | set(fit.ids) == set(train.ids) and not set(val.ids) & set(fit.ids)
    assert not set(val.ids) & set(test.ids)
    assert abs(len(val) - 0.1 * len(train)) <= 1
    counts = np.bincount(val.labels.numpy())
    assert counts.max() - counts.min() <= 1  # stratified
    again = load_dataset(name, "validation")
    assert np.array_equal(val.ids, again.ids) and (val.images == again.images).all()
    by_id = dict(zip(train.ids.tolist(), range(len(train)), strict=True))
    rows = [by_id[i] for i in val.ids[:20].tolist()]
    assert (train.images[rows] == val.images[:20]).all() and (train.labels[rows] == val.labels[:20]).all()


def test_forbidden_split_is_refused(monkeypatch):
    monkeypatch.setenv(FORBIDDEN_SPLITS_ENV, "test")
    with pytest.raises(DataError, match="test"):
        load_dataset("digits", "test")
    assert len(load_dataset("digits", "validation")) > 0


def test_best_ignores_stopped_trials_breaks_ties_by_cost_and_names_the_cheapest_within_tolerance():
    import pandas as pd

    from tuning.search import pick_best

    search = TuneSearch.model_validate(
        _with(objective={"metric": "accuracy", "defense": "invgan", "attack": "fgsm", "tolerance": 0.02})
    )
    table = pd.DataFrame(
        {
            "trial_id": ["a", "b", "c", "d", "e"],
            "objective": [0.90, 0.95, 0.90, 0.94, 0.99],
            "seconds_per_example": [0.5, 0.4, 0.3, 0.1, 0.01],
            "status": ["complete", "complete", "complete", "complete", "stopped"],
        }
    )
    best, cheapest = pick_best(table, search)
    assert best.trial_id == "b" and cheapest.trial_id == "d"  # e is better but stopped early (fewer examples)
    tied = table.assign(objective=[0.9, 0.9, 0.9, 0.8, 0.99])
    assert pick_best(tied, search)[0].trial_id == "c"  # equal accuracy: the cheaper projection
    latent = TuneSearch.model_validate(
        _with(
            kind="inverter",
            objective={"metric": "latent_error"},
            space={"lr": {"loguniform": {"low": 1e-4, "high": 1e-3}}},
        )
    )
    assert latent.mode == "min" and pick_best(table, latent)[0].trial_id == "c"  # 0.90 twice: the cheaper
