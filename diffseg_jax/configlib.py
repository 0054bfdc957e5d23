"""Config checks run at start-up, and config (de)serialisation.

Configs are locked ``ml_collections.ConfigDict`` objects (``configs/base.py``), so an override of an unknown
key fails in the flag parser; :func:`validate` then rejects values and combinations that cannot work,
naming the key, the value and a fix, before any data is built or compiled.
"""

from __future__ import annotations

import copy
import json
import os

import ml_collections

from diffseg_jax import writers

COMPUTE_DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
    """A config that cannot work (or does not fit the run it is used on); the message names the key and the fix."""


def fail(key: str, value, fix: str):
    raise ConfigError(f"Invalid config: {key}={value!r}. {fix}")


# Keys of a model group that are not arguments of the model class: the name, nnU-Net's planning settings, and
# the weights a run starts from (SegFormer's model.pretrained, imported after the build).
MODEL_SETTINGS = ("name", "plan", "pretrained", "pretrained_revision")


# The config's file and folder paths: a run records them absolute.
PATH_KEYS = ("data.data_dir", "data.manual_dir", "train.init_weights")


def save(config: ml_collections.ConfigDict, path: str) -> None:
    """Writes the config as JSON (for the record; runs are configured by the config files).

    The paths of :data:`PATH_KEYS` are written absolute (``~`` expanded, relative ones resolved against the
    current directory), so ``configs/from_run.py`` finds the run's data from any directory later; ``config``
    itself is not changed.
    """
    record = json.loads(config.to_json_best_effort())
    for dotted in PATH_KEYS:
        section, key = dotted.split(".")
        value = record.get(section, {}).get(key)
        if isinstance(value, str) and value:
            record[section][key] = os.path.abspath(os.path.expanduser(value))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    writers.save_json_whole(path, record, indent=2, sort_keys=True)  # whole: a crash never leaves half of it


def flatten(node: dict, prefix: str = "") -> dict:
    """{'group.key': value} of a (config) dict's leaves."""
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def load(path: str) -> ml_collections.ConfigDict:
    """Reads a config saved by :func:`save`."""
    with open(path, encoding="utf-8") as f:
        return ml_collections.ConfigDict(json.load(f))


def tuples(value):
    """JSON lists back as the tuples the configs hold (ml_collections does not assign a list to a tuple field)."""
    if isinstance(value, (list, tuple)):
        return tuple(tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: tuples(v) for k, v in value.items()}
    return value


def load_onto(
    default: ml_collections.ConfigDict, recorded: ml_collections.ConfigDict, path: str
) -> ml_collections.ConfigDict:
    """A config saved by :func:`save` (a run's ``config.json`` at ``path``, read by :func:`load` into
    ``recorded``), merged onto ``default``.

    ``default`` is the config file's config for the run's architecture: it gives the declared types (tuples,
    typed placeholders) and the lock, the file gives every value. Keys the file lacks (a run recorded before
    they existed) keep their defaults; keys only the file has (a planned network's) are added.
    """
    c = copy.deepcopy(default)

    def merge(node: ml_collections.ConfigDict, values: dict, prefix: str) -> None:
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(node.get(key, None), ml_collections.ConfigDict):
                merge(node[key], value, f"{prefix}{key}.")
                continue
            try:
                with node.unlocked():
                    node[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else tuples(value)
            except TypeError as e:
                raise TypeError(
                    f"{path}: {prefix}{key}={value!r} does not fit this version's config ({e})."
                ) from e

    merge(c, recorded.to_dict(), "")
    return c
