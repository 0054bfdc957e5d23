"""diffseg_jax.api: configs by path and by name; load_run/segment (the trained-run check is in test_cli's
quickstart test, which has a trained run)."""

import importlib

import pytest
from conftest import ROOT

import diffseg_jax


def test_get_config_by_path_and_by_name_equals_the_config_module(tmp_path, monkeypatch):
    expected = importlib.import_module("configs.quickstart").get_config("tiny").to_dict()
    by_path = diffseg_jax.get_config(f"{ROOT}/configs/quickstart.py:tiny")
    assert by_path.to_dict() == expected
    monkeypatch.chdir(tmp_path)  # no ./configs here: the name resolves to the shipped configs
    assert diffseg_jax.get_config("quickstart:tiny").to_dict() == expected
    assert diffseg_jax.get_config("quickstart.py:tiny").to_dict() == expected
    segdiff = diffseg_jax.get_config("e2_isic:segdiff")
    assert segdiff.model.name == "segdiff" and segdiff.data.name == "isic2016"
    assert diffseg_jax.get_config("quickstart").data.image_size == 32  # no variant: the full quickstart


def test_get_config_is_locked_and_names_what_is_missing(tmp_path, monkeypatch):
    config = diffseg_jax.get_config("quickstart:tiny")
    with pytest.raises(AttributeError):
        config.train.num_stpes = 3  # misspelt keys fail, as on the command line
    assert diffseg_jax.get_config("quickstart:tiny", lock=False).is_locked is False
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="e9_isic"):
        diffseg_jax.get_config("e9_isic")


def test_load_run_names_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        diffseg_jax.load_run(str(tmp_path))
    with pytest.raises(AttributeError, match="no attribute"):
        diffseg_jax.no_such_name  # noqa: B018
