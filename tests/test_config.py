"""EarlyExitConfig: the one description of the early-exit family (validation, file format, grid, CLI, policy)."""

from __future__ import annotations

import argparse
import json

import pytest

from hf_safe_exit import EarlyExit, EarlyExitConfig, PoEConfig
from hf_safe_exit.config import InvalidConfigError, config_fields


@pytest.mark.parametrize("kwargs,match", [
    ({"measure": "entropy"}, "Unknown confidence measure"),
    ({"measure": 3}, "Unknown confidence measure"),
    ({"schedule": "linear"}, "schedule='linear' is unknown"),
    ({"decay_tau": 0}, "decay_tau=0 must be"),
    ({"decay_tau": float("inf")}, "decay_tau=inf must be"),
    ({"decay_tau": "4"}, "decay_tau='4' must be"),
    ({"decay_tau": True}, "decay_tau=True must be"),
    ({"min_exit_layer": 0}, "min_exit_layer=0 must be a positive integer"),
    ({"min_exit_layer": "one"}, "min_exit_layer='one' must be a positive integer"),
    ({"min_exit_layer": 1.0}, "min_exit_layer=1.0 must be a positive integer"),
    ({"exit_layers": []}, "exit_layers=\\[\\] must be"),
    ({"exit_layers": [2, 2]}, "must be distinct"),
    ({"exit_layers": "3"}, "must be distinct positive integers"),
    ({"exit_layers": [0]}, "must be distinct positive integers"),
    ({"exit_layers": [1, 3], "min_exit_layer": 2}, "lie below min_exit_layer=2"),
    ({"anytime": "product"}, "anytime='product' is unknown"),
    ({"anytime": {"weights": "quadratic"}}, "weights='quadratic'"),
])
def test_every_setting_is_validated_with_a_one_line_error(kwargs, match):
    with pytest.raises(InvalidConfigError, match=match) as info:
        EarlyExitConfig(**kwargs)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


def test_values_are_normalised_and_compare_by_value():
    config = EarlyExitConfig(measure="softmax", exit_layers=[6, 3], decay_tau=2, anytime="poe")
    assert config.exit_layers == (3, 6) and config.decay_tau == 2.0 and config.anytime == PoEConfig()
    assert config == EarlyExitConfig(measure="softmax", exit_layers=(3, 6), decay_tau=2.0, anytime=PoEConfig())
    assert hash(config) == hash(EarlyExitConfig(measure="softmax", exit_layers=(3, 6), decay_tau=2.0,
                                                anytime=PoEConfig()))


def test_json_round_trip_and_flat_metadata():
    config = EarlyExitConfig(measure="saturation", schedule="decaying", decay_tau=8.0, min_exit_layer=2,
                             exit_layers=(2, 4), anytime=PoEConfig(weights="uniform"))
    data = json.loads(json.dumps(config.to_dict()))
    assert EarlyExitConfig.from_dict(data) == config
    assert set(data) == set(config_fields())
    # a loss table's metadata: read leniently, other keys are ignored, absent settings take the defaults
    table_meta = {"measure": "meta", "schedule": "constant", "task": "cnndm", "lambdas": [0.5, 1.0]}
    assert EarlyExitConfig.from_dict(table_meta, strict=False) == EarlyExitConfig(measure="meta")
    # anything else is read strictly: a misspelt setting must not fall back to its default
    with pytest.raises(InvalidConfigError, match=r"\['lambdas', 'task'\] are not early-exit settings"):
        EarlyExitConfig.from_dict(table_meta)
    with pytest.raises(InvalidConfigError, match=r"\['shedule'\] are not early-exit settings"):
        EarlyExitConfig.from_dict({"measure": "meta", "shedule": "decaying"})
    with pytest.raises(InvalidConfigError, match="min_exit_layer='one'"):
        EarlyExitConfig.from_dict({"measure": "meta", "min_exit_layer": "one"})
    with pytest.raises(InvalidConfigError, match="must be a mapping"):
        EarlyExitConfig.from_dict(["meta"])


def test_grid_spans_the_product_of_settings():
    grid = EarlyExitConfig.grid(measure=["meta", "saturation"], decay_tau=[1.0, 4.0], schedule=["decaying"])
    assert len(grid) == 4 and len(set(grid)) == 4
    assert {(c.measure, c.decay_tau, c.schedule) for c in grid} == {
        (m, t, "decaying") for m in ("meta", "saturation") for t in (1.0, 4.0)}
    base = EarlyExitConfig(min_exit_layer=2)
    assert all(c.min_exit_layer == 2 for c in EarlyExitConfig.grid(base, measure=["softmax", "meta"]))
    with pytest.raises(InvalidConfigError, match="not early-exit settings"):
        EarlyExitConfig.grid(threshold=[0.5])
    with pytest.raises(InvalidConfigError, match="schedule"):
        EarlyExitConfig.grid(schedule=["constant", "linear"])
    for bad in ("meta", [], 3):  # a string would be iterated letter by letter; nothing to span is a mistake
        with pytest.raises(InvalidConfigError, match="must be a non-empty list"):
            EarlyExitConfig.grid(measure=bad)


def test_cli_has_one_option_per_setting_and_reads_back_the_config():
    parser = argparse.ArgumentParser()
    for name, options in EarlyExitConfig.cli_options().items():
        parser.add_argument("--" + name.replace("_", "-"), default=None, **options)
    args = parser.parse_args(["--measure", "softmax", "--exit-layers", "2", "4", "--decay-tau", "2", "--anytime", "poe"])
    given = {k: getattr(args, k) for k in config_fields() if getattr(args, k) is not None}
    assert EarlyExitConfig.from_dict(given) == EarlyExitConfig(measure="softmax", exit_layers=(2, 4), decay_tau=2.0,
                                                               anytime="poe")
    assert set(EarlyExitConfig.help()) == set(config_fields())


def test_early_exit_is_a_config_at_a_threshold():
    config = EarlyExitConfig(measure="softmax", min_exit_layer=2)
    policy = EarlyExit(0.7, config=config)
    assert policy == EarlyExit(threshold=0.7, measure="softmax", min_exit_layer=2)
    assert policy.config is config and policy.measure == "softmax" and policy.min_exit_layer == 2
    with pytest.raises(TypeError, match="not both"):
        EarlyExit(0.7, config=config, measure="meta")
    with pytest.raises(TypeError, match="unexpected keyword"):
        EarlyExit(0.7, treshold=0.5)
    with pytest.raises(AttributeError):
        policy.not_a_setting  # noqa: B018


def test_a_new_setting_needs_no_code_outside_the_class():
    # every generic path reads the fields: subclass the configuration with one more setting and run them
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Extended(EarlyExitConfig):
        patience: int = dataclasses.field(default=3, metadata={"help": "tokens to wait", "cli": {"type": int}})

    config = Extended(measure="softmax", patience=7)
    data = json.loads(json.dumps(config.to_dict()))
    assert data["patience"] == 7 and Extended.from_dict(data) == config
    assert Extended.from_dict({"measure": "softmax"}).patience == 3  # a file written before the setting existed
    assert "patience" in Extended.cli_options() and "patience" in Extended.help()
    assert {c.patience for c in Extended.grid(config, patience=[1, 2])} == {1, 2}
    assert config.accepts(Extended(measure="softmax", patience=7))
    assert not config.accepts(Extended(measure="softmax", patience=1))

