"""diffseg_jax.validation: the table of settings with fixed choices (CHOICES), checked by one loop with one message.
(The checks of single values and combinations are in test_train.py's test_config_validation_* tests.)"""

import re

import pytest

from diffseg_jax import build, configlib, defaults, models, sampling, validation


def _node(config, key):
    *groups, name = key.split(".")
    for group in groups:
        config = config[group]
    return config, name


@pytest.mark.parametrize("key", sorted(validation.CHOICES))
def test_a_value_outside_a_settings_choices_is_refused_naming_key_value_and_choices(key):
    config = defaults.get_config("ensemdiff,tiny")
    validation.validate(config, check_data=False)  # the defaults pass
    node, name = _node(config, key)
    node[name] = "not_a_choice"
    choices = validation.allowed(key)
    message = f"Invalid config: {key}='not_a_choice'. Choose one of {choices}"
    with pytest.raises(configlib.ConfigError, match=re.escape(message)):
        validation.validate(config, check_data=False)


@pytest.mark.parametrize("arch", sorted(defaults.MODEL_DEFAULTS))
def test_every_key_of_the_table_is_in_each_architectures_defaults_and_holds_a_choice(arch):
    for config in (defaults.get_config(arch), defaults.get_config(f"{arch},tiny")):
        for key in validation.CHOICES:
            node, name = _node(config, key)
            assert name in node, f"{key} is not a setting of {arch}'s config"
            assert node[name] in validation.allowed(key), (arch, key, node[name])


def test_the_tables_copies_equal_the_owners_tuples():
    """build and sampling sit beside or above validation in the layers: the table repeats their tuples."""
    assert validation.CHOICES["train.optimizer"] == build.OPTIMIZERS
    assert validation.CHOICES["train.lr_schedule"] == build.LR_SCHEDULES
    assert validation.CHOICES["eval.member_output"] == sampling.MEMBER_OUTPUTS


def test_a_registry_is_read_when_checked_so_a_model_registered_later_passes(monkeypatch):
    config = defaults.get_config("ensemdiff,tiny")
    monkeypatch.setitem(models.MODELS, "my_net", models.MODELS["ensemdiff"])
    config.model.name = "my_net"
    validation.check_choices(config)  # no error: the registry as it is now
    assert "my_net" in validation.allowed("model.name")
