"""The evaluation config fails before any work, naming the field; overrides and hashes behave."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from jobs.config import EvalConfig, apply_overrides, load_config

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"


@pytest.mark.reliability(kind="bad_input")
@pytest.mark.parametrize(
    "override, message",
    [
        ("attacks.fgsm.params.epss=0.2", "epss"),
        ("defenses.invgan.params.stepz=3", "stepz"),
        ("attacks.bpda.target=classifier", "goes through a defense"),
        ("attacks.fgsm.target=invgan", "its target must be 'classifier'"),
        ("attacks.fgsm.target=nowhere", "not 'classifier', 'each' or a defense"),
        ("attacks.fgsm.kind=fgsn", "unknown attack kind"),
        ("defenses.none.kind=magic", "unknown defense kind"),
        ("shard_size=0", "shard_size"),
        ("surprise=1", "surprise"),
        # defense budgets: refused at validation, like attack parameters, not inside a Ray worker
        ("defenses.invgan.params.steps=-5", r"defenses.invgan\n.*steps=-5: give a whole number"),
        ("defenses.invgan.params.steps=2.5", "steps=2.5"),
        ("defenses.invgan.params.lr=0", "lr=0: give a finite step size > 0"),
        ("defenses.invgan.params.lr=.nan", "lr=nan"),
        ("defenses.invgan.params.optimizer=adamw", "optimizer='adamw': choose one of adam, sgd, momentum"),
        ("defenses.dg={kind: defensegan, params: {restarts: 0}}", "restarts=0"),
    ],
)
def test_bad_values_fail_naming_the_field(override, message):
    with pytest.raises(ValidationError, match=message):
        load_config(SMOKE, [override])


def test_rp_needs_an_inverter_defense():
    with pytest.raises(ValidationError, match="inverter"):
        load_config(SMOKE, ["attacks.rp.kind=rp", "attacks.rp.target=none"])


@pytest.mark.parametrize("target", ["none", "each"])
def test_unrolled_against_no_defense_fails_at_validation(target):
    """Not inside a Ray worker after the models are loaded: the smoke config has a `none` defense."""
    with pytest.raises(ValidationError, match="unrolled differentiates through projection steps"):
        load_config(
            SMOKE, ["attacks.u={kind: unrolled, target: %s, base: {kind: pgd_linf, params: {eps: 0.3}}}" % target]
        )


def test_unrolled_against_a_projection_defense_is_valid():
    cfg = load_config(SMOKE, ["attacks.u={kind: unrolled, target: invgan, base: {kind: pgd_linf, params: {eps: 0.3}}}"])
    assert cfg.attacks["u"].target == "invgan"


def test_overrides_parse_yaml_values_and_change_the_hash():
    base = load_config(SMOKE)
    other = load_config(SMOKE, ["attacks.fgsm.params.eps=0.2"])
    assert other.attacks["fgsm"].params["eps"] == 0.2 and other.config_hash() != base.config_hash()
    assert load_config(SMOKE, ["resources.num_workers=1"]).config_hash() == base.config_hash()  # not a result
    with pytest.raises(ValueError, match="dotted.path=value"):
        apply_overrides({}, ["no-equals-sign"])


def test_shipped_configs_validate():
    from jobs.red import RedConfig

    for path in SMOKE.parent.glob("*.yaml"):
        load_config(path, model=RedConfig if path.name.startswith("red") else EvalConfig)


def test_shipped_configs_are_found_from_outside_the_checkout(tmp_path, monkeypatch):
    from jobs.red import RedConfig

    monkeypatch.chdir(tmp_path)
    assert load_config("configs/smoke.yaml").name == "smoke"
    assert load_config("configs/red_smoke.yaml", model=RedConfig, limit=4).limit == 4
    with pytest.raises(FileNotFoundError, match="shipped configs: .*smoke.yaml"):
        load_config("configs/nope.yaml")


@pytest.mark.reliability(kind="bad_input")
@pytest.mark.parametrize(
    "text, message",
    [
        ("- a\n- b\n", "expected a mapping of settings .* got a YAML list"),
        ("just words\n", "got a YAML str"),
        ("name: [unclosed\n", "not valid YAML"),
        ('!!python/object/apply:os.system ["echo pwned"]\n', "not valid YAML .*python/object"),  # safe loading only
    ],
)
def test_a_config_that_is_not_a_yaml_mapping_fails_in_one_line(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        load_config(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.reliability(kind="bad_input")
def test_every_defense_kind_refuses_an_impossible_budget_itself():
    """The constructors make the same checks (table-driven over the registry: a new kind is covered)."""
    import inspect

    from jobs.config import DEFENSES

    for _kind, cls in DEFENSES.items():
        params = inspect.signature(cls).parameters
        for key, bad in [("steps", -1), ("restarts", 0), ("lr", -0.1), ("optimizer", "rmsprop")]:
            if key in params:
                with pytest.raises(ValueError, match=key):
                    cls.check_params({key: bad})
                cls.check_params({key: params[key].default})  # the defaults pass


@pytest.mark.reliability(kind="bad_input")
def test_config_errors_are_one_line_per_problem_naming_each_field():
    from jobs.config import describe_error

    with pytest.raises(ValidationError) as err:
        load_config(SMOKE, ["shard_size=0", "defenses.invgan.params.steps=-5"])
    text = describe_error(err.value)
    assert "\n" not in text and "errors.pydantic.dev" not in text
    assert "shard_size: Input should be greater than 0" in text
    assert "defenses.invgan: defense kind 'invgan': steps=-5" in text


def test_masking_checks_derive_their_attacks_once_and_survive_a_round_trip():
    cfg = load_config(SMOKE, ["masking_checks={examples: 3, eps_factor: 2, steps_factor: 3}"])
    checks = sorted(n for n in cfg.attacks if n.startswith("check/"))
    assert checks and all(cfg.attacks[n].limit <= 3 for n in checks)
    assert any(n.endswith("/steps_x3") for n in checks) and any("/eps_" in n for n in checks)
    again = EvalConfig.model_validate(cfg.model_dump(mode="json"))  # what a Ray worker does
    assert list(again.attacks) == list(cfg.attacks) and again.config_hash() == cfg.config_hash()
    assert not any(n.startswith("check/") for n in load_config(SMOKE).attacks)


def test_attack_names_in_the_check_namespace_are_refused():
    with pytest.raises(ValidationError, match="reserved for the attacks masking_checks derives"):
        load_config(SMOKE, ["attacks.check/mine={kind: fgsm}"])
