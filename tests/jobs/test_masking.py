"""Gradient-masking checks: the four rules on rows with a known answer, the extra attacks they derive,
and a real masked model (a classifier behind input quantization, whose gradient is zero) caught by
its black-box attack while the plain classifier is not flagged."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from jobs.masking import expand_checks, flags_markdown, flags_summary, masking_flags, profile

WEIGHTS = Path(__file__).resolve().parents[2] / "weights"
PGD = {"kind": "pgd_linf", "params": {"eps": 0.3, "steps": 40}}
FGSM = {"kind": "fgsm", "params": {"eps": 0.3}}
NES = {"kind": "nes", "target": "each", "base": PGD}
BPDA = {"kind": "bpda", "target": "each", "base": PGD}


def rows_from(correct: dict[tuple[str, str], list[bool]]) -> pd.DataFrame:
    """Rows (example_id, attack, defense, correct, attacked) from {(defense, attack): per-example correctness}."""
    out = [
        dict(example_id=i, attack=attack, defense=defense, correct=c, attacked=True)
        for (defense, attack), flags in correct.items()
        for i, c in enumerate(flags)
    ]
    return pd.DataFrame(out)


def flagged(flags: pd.DataFrame) -> set[tuple[str, str, str]]:
    return {(r.defense, r.check, r.attack) for r in flags[flags["flagged"]].itertuples()}


def test_profiles_read_norm_budget_and_steps_through_wrappers():
    assert profile(FGSM) == profile({"kind": "fgsm"}) and profile(FGSM).steps == 1
    p = profile(BPDA)
    assert (p.norm, p.eps, p.steps, p.black_box) == ("linf", 0.3, 40, False)
    assert profile(NES).black_box and profile({"kind": "cw"}).norm is None  # CW has no fixed budget


def test_each_rule_flags_exactly_the_cells_it_should():
    ten = lambda k: [True] * k + [False] * (10 - k)  # noqa: E731 - accuracy k/10
    attacks = {
        "fgsm": FGSM,
        "pgd": PGD,
        "bpda": BPDA,
        "nes": NES,
        **expand_checks({"pgd": PGD, "bpda": BPDA}, examples=10, eps_factor=3, steps_factor=4),
    }
    rows = rows_from(
        {
            # defense A: PGD weaker than FGSM (a); NES stronger than BPDA (c); BPDA not converged (d);
            # wide ε stays high (b)
            ("A", "fgsm"): ten(3),
            ("A", "pgd"): ten(6),
            ("A", "bpda"): ten(5),
            ("A", "nes"): ten(2),
            ("A", "check/bpda/steps_x4"): ten(1),
            ("A", "check/bpda/eps_0.9"): ten(4),
            ("A", "check/pgd/steps_x4"): ten(6),
            ("A", "check/pgd/eps_0.9"): ten(0),
            # defense B: a healthy ordering: nothing flagged
            ("B", "fgsm"): ten(5),
            ("B", "pgd"): ten(1),
            ("B", "bpda"): ten(1),
            ("B", "nes"): ten(4),
            ("B", "check/bpda/steps_x4"): ten(1),
            ("B", "check/bpda/eps_0.9"): ten(0),
            ("B", "check/pgd/steps_x4"): ten(1),
            ("B", "check/pgd/eps_0.9"): ten(0),
        }
    )
    flags = masking_flags(rows, attacks)
    assert flagged(flags) == {
        ("A", "single_step_stronger", "pgd"),
        ("A", "single_step_stronger", "bpda"),
        ("A", "black_box_stronger", "pgd"),
        ("A", "black_box_stronger", "bpda"),
        ("A", "not_converged", "bpda"),
        ("A", "eps_not_zero", "check/bpda/eps_0.9"),
    }
    assert set(flags["check"]) == {"single_step_stronger", "black_box_stronger", "not_converged", "eps_not_zero"}
    assert not flags[flags["defense"] == "B"]["flagged"].any()
    assert flags_summary(flags)["checks"] == len(flags) and len(flags_summary(flags)["flagged"]) == 6
    assert "6 flagged" in flags_markdown(flags) and "| A | not_converged | bpda |" in flags_markdown(flags)


def test_comparisons_are_paired_on_the_examples_both_attacks_ran_on():
    # BPDA ran on the first 4 examples only (a `limit`): there FGSM leaves 0/4, BPDA 0/4 -> no flag,
    # although FGSM's accuracy over all 10 examples (0.6) is far above... and below BPDA's unpaired mean.
    rows = rows_from({("A", "fgsm"): [False] * 4 + [True] * 6, ("A", "bpda"): [False] * 4})
    flags = masking_flags(rows, {"fgsm": FGSM, "bpda": BPDA})
    (row,) = flags.itertuples()
    assert (row.acc, row.acc_other, row.n, row.flagged) == (0.0, 0.0, 4, False)


def test_expand_checks_scales_the_loop_caps_linf_at_the_box_and_skips_what_cannot_be_checked():
    extra = expand_checks(
        {
            "fgsm": FGSM,
            "nes": NES,
            "bpda": BPDA,
            "bpda_default": {"kind": "bpda", "target": "each"},
            "l2": {"kind": "pgd_l2", "params": {"eps": 2.0}, "limit": 5},
        },
        examples=20,
        eps_factor=5,
        steps_factor=2,
    )
    assert set(extra) == {"check/bpda/eps_1", "check/bpda/steps_x2", "check/l2/eps_10", "check/l2/steps_x2"}
    assert extra["check/bpda/eps_1"]["base"]["params"] == {"eps": 1.0, "steps": 40}  # ℓ∞ 1.0: the whole box
    assert extra["check/bpda/steps_x2"]["base"]["params"] == {"eps": 0.3, "steps": 80}
    assert extra["check/l2/steps_x2"]["params"]["steps"] == 400  # the loop's default (200), doubled
    assert extra["check/bpda/eps_1"]["limit"] == 20 and extra["check/l2/eps_10"]["limit"] == 5
    assert BPDA["base"]["params"] == {"eps": 0.3, "steps": 40}  # the config's own spec is untouched


@pytest.mark.skipif(not (WEIGHTS / "digits" / "classifier.json").exists(), reason="no shipped digits weights")
def test_a_real_masked_gradient_is_caught_by_the_black_box_rule():
    from invgan_core.adaptive import NES as NESAttack
    from invgan_core.attacks import FGSM as FGSMAttack
    from invgan_core.attacks import LinfPGD
    from invgan_core.checkpoint import load_model
    from invgan_core.data import load_dataset

    f = load_model(WEIGHTS / "digits" / "classifier", kind="classifier")[0].requires_grad_(False).eval()

    class Quantized(torch.nn.Module):  # rounding has zero gradient: white-box attacks see nothing
        def forward(self, x):
            return f(torch.round(x * 4) / 4)

    test = load_dataset("digits", "test").subset(48)
    x, y, ids = test.images, test.labels, torch.as_tensor(test.ids)
    attacks = {
        "fgsm": FGSMAttack(eps=0.3),
        "pgd": LinfPGD(eps=0.3, steps=20),
        "nes": NESAttack(samples=20, sigma=0.1, attack=LinfPGD(eps=0.3, steps=20)),
    }
    specs = {
        "fgsm": FGSM,
        "pgd": {"kind": "pgd_linf", "params": {"eps": 0.3, "steps": 20}},
        "nes": {"kind": "nes", "target": "each", "base": {"kind": "pgd_linf", "params": {"eps": 0.3, "steps": 20}}},
    }
    correct = {}
    for defense, model in (("plain", f), ("quantized", Quantized())):
        for name, attack in attacks.items():
            correct[(defense, name)] = (~attack(model, x, y, ids=ids).success).tolist()
    flags = masking_flags(rows_from(correct), specs)
    assert ("quantized", "black_box_stronger", "pgd") in flagged(flags)
    assert not flags[flags["defense"] == "plain"]["flagged"].any()


@pytest.mark.skipif(not (WEIGHTS / "digits" / "classifier.json").exists(), reason="no shipped digits weights")
def test_an_unconverged_attack_in_a_real_evaluation_is_flagged_and_kept_out_of_the_tables():
    """The smoke config with a deliberately short BPDA (2 steps of 0.01 at ε = 0.3): its steps × 20 check
    attack finds what the configured attack missed, so the cell is flagged `not_converged`."""
    from jobs import run_tables
    from jobs.config import load_config
    from jobs.evaluate import EvalWorker, masking_flags, masking_text

    smoke = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"
    cfg = load_config(
        smoke,
        [
            "limit=8",
            "defenses={none: {kind: none}}",
            "attacks.bpda.base.params={eps: 0.3, steps: 2, abs_stepsize: 0.01}",
            "masking_checks={examples: 8, steps_factor: 20, eps_factor: 3}",
        ],
    )
    rows = EvalWorker(cfg.model_dump(mode="json")).run_shard(0, 0, 8)
    assert {"check/bpda/steps_x20", "check/bpda/eps_0.9"} <= set(rows["attack"])
    flags = masking_flags(cfg, rows)
    assert ("none", "not_converged", "bpda") in flagged(flags)
    assert ("none", "single_step_stronger", "bpda") in flagged(flags)  # 2 steps of 0.01 are weaker than FGSM
    wide = rows[rows["attack"] == "check/bpda/eps_0.9"]
    assert wide["linf"].max() > 0.3 + 1e-6  # the wide end really spends more than ε (its step scaled with ε)
    summary = run_tables.summarize(rows[~rows["attack"].str.startswith("check/")])
    assert set(summary["accuracy"]["none"]) == {"clean", "fgsm", "bpda", "worst_case"}
    assert "FLAG none: not_converged — bpda" in masking_text({"checks": len(flags), **flags_summary(flags)})


def test_diverged_rows_are_left_out_of_the_checks():
    rows = rows_from({("A", "fgsm"): [False] * 4, ("A", "pgd"): [True] * 4})
    rows["diverged"] = rows["attack"] == "pgd"  # every PGD row diverged: nothing left to compare
    assert masking_flags(rows, {"fgsm": FGSM, "pgd": PGD}).empty
    rows["diverged"] = False
    assert flagged(masking_flags(rows, {"fgsm": FGSM, "pgd": PGD})) == {("A", "single_step_stronger", "pgd")}


def test_only_attacks_aimed_at_the_defense_are_judged():
    """RP computed through InvGAN and fed to Defense-GAN is a transfer attack there: weaker than FGSM is no flag."""
    rp = {"kind": "rp", "target": "inv", "base": PGD}
    rows = rows_from(
        {
            ("dg", "fgsm"): [True] * 2 + [False] * 8,
            ("dg", "rp"): [True] * 9 + [False],
            ("inv", "fgsm"): [True] * 2 + [False] * 8,
            ("inv", "rp"): [True] * 9 + [False],
        }
    )
    kinds = {"dg": "defensegan", "inv": "invgan"}
    flags = masking_flags(rows, {"fgsm": FGSM, "rp": rp}, defense_kinds=kinds)
    assert flagged(flags) == {("inv", "single_step_stronger", "rp")}
    assert set(flags["defense"]) == {"inv"}
