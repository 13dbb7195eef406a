"""Automatic gradient-masking checks over an evaluation's rows.

The checklist of Carlini et al., "On Evaluating Adversarial Robustness" (2019, §5) and Athalye et al.
(2018, §3): a defense whose number comes from a masked gradient shows tell-tale signs that the rows of
one evaluation already contain, or that a few extra attacks on a few examples reveal.

    a. single_step_stronger  an iterative attack leaves a higher accuracy than a single-step attack
                             (FGSM) of the same norm and no larger ε
    b. eps_not_zero          with ε grown well past the threat model (ε × factor) the attack still
                             leaves accuracy above `floor`: an unbounded attack must reach ~0
    c. black_box_stronger    a black-box attack (nes, substitute) leaves a lower accuracy than an
                             iterative white-box attack of the same norm and no smaller ε
    d. not_converged         the same attack with `steps_factor` × the steps leaves a lower accuracy:
                             the reported number is not the attack's converged value

Every comparison is paired: the two attacks' accuracies on the examples both ran on, per defense.
(b) and (d) need the extra attacks `expand_checks` derives from the config (named `check/<attack>/...`,
run on `examples` examples spread over the split, a subset of the attack's own); they never enter the
headline tables or the worst case, only these flags.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import pandas as pd

from jobs.run_tables import scored
from jobs.specs import WRAPPERS, AttackSpec

CHECK_PREFIX = "check/"
BLACK_BOX = {"nes", "substitute"}
CHECKS = ("single_step_stronger", "eps_not_zero", "black_box_stronger", "not_converged")


@dataclass(frozen=True)
class Profile:
    """What the checks need to know of one configured attack."""

    norm: str | None  # "linf", "l2", "l1" or None (no fixed budget, e.g. CW)
    eps: float | None
    steps: int  # gradient steps of the (inner) loop; 1 = single step
    black_box: bool


def _inner(spec: dict) -> dict:
    """The attack loop of a spec: a wrapper's base (with its default when not given), else the spec."""
    return spec.get("base") or spec


def profile(spec: dict) -> Profile:
    """Profile of an attack spec (the `attacks.<name>` mapping of an eval config, as a dict)."""
    attack = AttackSpec.model_validate(spec).build()
    loop = getattr(attack, "attack", attack)  # wrappers hold their loop in `.attack`
    norm = getattr(loop, "norm", None)
    eps = getattr(loop, "eps", None)
    return Profile(
        norm=None if eps is None or norm is None else norm.name.lower(),
        eps=None if eps is None else float(eps),
        steps=int(getattr(loop, "steps", 1) or 1),
        black_box=spec["kind"] in BLACK_BOX,
    )


def _scaled(spec: dict, key: str, factor: float) -> dict | None:
    """A copy of spec with the loop's `key` multiplied by factor (ints stay ints), or None if it has none."""
    if spec["kind"] in WRAPPERS and not spec.get("base"):
        return None  # the wrapper's default loop: nothing in the config to scale
    out = copy.deepcopy(spec)
    inner = out["base"] if out.get("base") else out
    params = inner.setdefault("params", {})
    value = params.get(key)
    if value is None:  # the loop's default
        loop = AttackSpec.model_validate(spec).build()
        value = getattr(getattr(loop, "attack", loop), key, None)
    if value is None or isinstance(value, bool):
        return None
    params[key] = int(round(value * factor)) if isinstance(value, int) else round(float(value) * factor, 9)
    if key == "eps" and params.get("abs_stepsize") is not None:  # a step relative to ε scales by itself
        params["abs_stepsize"] = round(float(params["abs_stepsize"]) * factor, 9)
    return out


def expand_checks(attacks: dict[str, dict], *, examples: int, eps_factor: float, steps_factor: int) -> dict[str, dict]:
    """The extra attacks that checks (b) and (d) need, for every white-box iterative attack of the config:
    `check/<name>/eps_E` (E = ε × eps_factor; for ℓ∞ capped at 1, the whole box) and `check/<name>/steps_xK`."""
    extra: dict[str, dict] = {}
    for name, spec in attacks.items():
        if name.startswith(CHECK_PREFIX):
            continue
        p = profile(spec)
        if p.black_box or p.steps <= 1:
            continue
        limit = min(examples, spec["limit"]) if spec.get("limit") else examples
        if p.eps is not None and eps_factor > 1:
            wide = _scaled(spec, "eps", eps_factor if p.norm != "linf" else min(eps_factor, 1.0 / p.eps))
            if wide is not None:
                eps = _inner(wide)["params"]["eps"]
                extra[f"{CHECK_PREFIX}{name}/eps_{eps:g}"] = {**wide, "limit": limit}
        if steps_factor > 1:
            longer = _scaled(spec, "steps", steps_factor)
            if longer is not None:
                extra[f"{CHECK_PREFIX}{name}/steps_x{steps_factor}"] = {**longer, "limit": limit}
    return extra


def is_check(attack: str) -> bool:
    return attack.startswith(CHECK_PREFIX)


def _paired(acc: pd.DataFrame, a: str, b: str) -> tuple[float, float, int] | None:
    """(accuracy under a, under b, n) on the examples both attacks ran on; None if none in common."""
    if a not in acc.columns or b not in acc.columns:
        return None
    both = acc[[a, b]].dropna()
    if both.empty:
        return None
    return float(both[a].astype(bool).mean()), float(both[b].astype(bool).mean()), len(both)


def masking_flags(
    rows: pd.DataFrame,
    attacks: dict[str, dict],
    *,
    tol: float = 0.02,
    floor: float = 0.1,
    defense_kinds: dict[str, str] | None = None,
) -> pd.DataFrame:
    """One row per check that applies: defense, check, attack, compared_with, acc, acc_other, n, flagged.

    `attacks` are the config's attack specs (dicts) including the `check/` ones; `tol` is how much worse
    (in accuracy) a comparison must be before it is flagged, `floor` the accuracy an unbounded attack
    must get below.

    The attack under test must be aimed at the defense (white box): its target is the defense or `each`,
    or the classifier when the defense is kind `none` (`defense_kinds` maps defense names to kinds; without
    it every attack counts as aimed at every defense). An attack computed on another target and fed to
    this defense is a transfer attack: it can be the stronger single step or black box it is compared
    with, never the attack a flag is about."""
    profiles = {name: profile(spec) for name, spec in attacks.items()}

    def aimed(name: str, defense: str) -> bool:
        if defense_kinds is None:
            return True
        target = attacks[name].get("target", "classifier")
        return target in ("each", defense) or (target == "classifier" and defense_kinds.get(defense) == "none")

    main = [n for n in attacks if not is_check(n)]
    out = []

    def add(defense, check, attack, other, pair, flagged):
        acc, acc_other, n = pair
        out.append(
            dict(
                defense=defense,
                check=check,
                attack=attack,
                compared_with=other,
                acc=acc,
                acc_other=acc_other,
                n=n,
                flagged=bool(flagged),
            )
        )

    rows = scored(rows)  # a diverged row is neither correct nor incorrect
    for defense, d_rows in rows[rows["attacked"]].groupby("defense", sort=False):
        acc = d_rows.pivot(index="example_id", columns="attack", values="correct")
        for name in main:
            p = profiles[name]
            if not aimed(name, defense):
                continue
            for other in main:
                q = profiles[other]
                if other == name or p.norm is None or p.norm != q.norm:
                    continue
                if p.eps is None or q.eps is None:  # unreachable: a profile has a norm only with an ε (narrows types)
                    continue
                # (a) iterative white-box vs single-step white-box with no larger budget
                if p.steps > 1 and q.steps == 1 and not p.black_box and not q.black_box and q.eps <= p.eps:
                    pair = _paired(acc, name, other)
                    if pair:
                        add(defense, "single_step_stronger", name, other, pair, pair[0] - pair[1] > tol)
                # (c) iterative white-box vs black-box with no larger budget (a black-box attack that beats
                # a single step is no sign of masking: (a) covers the single step)
                if p.steps > 1 and not p.black_box and q.black_box and q.eps <= p.eps:
                    pair = _paired(acc, name, other)
                    if pair:
                        add(defense, "black_box_stronger", name, other, pair, pair[0] - pair[1] > tol)
            for check_name in attacks:
                if not check_name.startswith(f"{CHECK_PREFIX}{name}/"):
                    continue
                if "/eps_" in check_name:  # (b) the ε sweep's wide end must reach ~0
                    if check_name in acc.columns and acc[check_name].notna().any():
                        wide = acc[check_name].dropna().astype(bool)
                        pair = (float(wide.mean()), floor, len(wide))
                        add(defense, "eps_not_zero", check_name, "floor", pair, pair[0] > floor)
                elif "/steps_x" in check_name:  # (d) more steps must not lower accuracy
                    pair = _paired(acc, name, check_name)
                    if pair:
                        add(defense, "not_converged", name, check_name, pair, pair[0] - pair[1] > tol)
    columns = ["defense", "check", "attack", "compared_with", "acc", "acc_other", "n", "flagged"]
    return pd.DataFrame(out, columns=columns)


def flags_markdown(flags: pd.DataFrame) -> str:
    """A short table of the raised flags (or one line saying none was raised, and how many checks ran)."""
    if flags.empty:
        return "Gradient-masking checks: none applied (no comparable attacks in this config).\n"
    raised = flags[flags["flagged"]]
    head = f"Gradient-masking checks: {len(flags)} run, {len(raised)} flagged.\n"
    if raised.empty:
        return head
    lines = [
        "| defense | check | attack | accuracy | compared with | its accuracy | n |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.defense} | {r.check} | {r.attack} | {r.acc:.3f} | {r.compared_with} | {r.acc_other:.3f} | {r.n} |"
        for r in raised.itertuples()
    ]
    return head + "\n" + "\n".join(lines) + "\n"


def flags_summary(flags: pd.DataFrame) -> dict:
    """For summary.json / MLflow: {'checks': n, 'flagged': [..rows..]}."""
    raised = flags[flags["flagged"]]
    return {"checks": int(len(flags)), "flagged": json.loads(raised.to_json(orient="records"))}
