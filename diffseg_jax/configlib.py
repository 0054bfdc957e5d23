"""Config files found by path or by name, checks run at start-up, and config (de)serialisation.

Configs are locked ``ml_collections.ConfigDict`` objects (``diffseg_jax/defaults.py``), so an override of an unknown
key fails in the flag parser; :func:`validate` then rejects values and combinations that cannot work,
naming the key, the value and a fix, before any data is built or compiled.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os

import ml_collections
from absl import flags
from ml_collections import config_flags

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


# The config files shipped with the package. An installed package holds the repository's configs/ as
# diffseg_jax/configs (pyproject.toml's package-dir; no top-level `configs` on sys.path); a checkout (or an editable
# install) reads configs/ beside the package.
_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_SHIPPED_DIRS = (
    os.path.join(_PACKAGE, "configs"),  # an installed package
    os.path.join(os.path.dirname(_PACKAGE), "configs"),  # the repository (checked by its pyproject.toml)
)


def shipped_config_dir() -> str | None:
    """The folder of the configs shipped with the package (None if it has none)."""
    installed, repository = _SHIPPED_DIRS
    if os.path.isdir(installed):
        return installed
    if os.path.isdir(repository) and os.path.isfile(
        os.path.join(os.path.dirname(repository), "pyproject.toml")
    ):
        return repository
    return None


def shipped_configs() -> dict[str, str]:
    """{name: file} of the shipped configs, e.g. ``{'quickstart': '.../configs/quickstart.py', ...}``."""
    directory = shipped_config_dir()
    if directory is None:
        return {}
    return {
        name[:-3]: os.path.join(directory, name)
        for name in sorted(os.listdir(directory))
        if name.endswith(".py") and not name.startswith("_")
    }


def config_file(name: str) -> str:
    """The file of config ``name``: a path to a config file, or the name of a shipped config (``quickstart``,
    ``e2_isic.py``). A repository path (``configs/e2_isic.py``) that does not exist from the working directory
    falls back to the shipped config of that name, so the README's commands work anywhere after ``pip install``.
    """
    if os.path.isfile(name):
        return name
    shipped = shipped_configs()
    folder, base = os.path.split(name)
    stem = base.removesuffix(".py")
    if folder in ("", "configs") and stem in shipped:
        return shipped[stem]
    raise FileNotFoundError(
        f"No config {name!r}: neither a config file (from {os.getcwd()}) nor a config shipped with the package. "
        f"Pass a file's path (configs/quickstart.py) or one of the shipped configs by name: "
        f"{', '.join(shipped) or '(none found)'}; ':tiny', ':segdiff' etc. after it pick a variant."
    )


def load_config(spec: str, lock: bool = True) -> ml_collections.ConfigDict:
    """The config ``--config spec`` gives: ``'configs/quickstart.py:tiny'``, ``'e2_isic.py:segdiff'`` or
    ``'quickstart'`` (the part after the first ':' is the file's ``get_config`` argument); locked as on the
    command line unless ``lock=False``, so a misspelt key fails."""
    name, _, arg = spec.partition(":")
    path = config_file(name)
    module_spec = importlib.util.spec_from_file_location(f"_diffseg_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    if lock:
        config.lock()
    return config


class _ConfigFileParser(flags.ArgumentParser):
    """ml_collections' config file parser, given a shipped config's name as well as a file's path."""

    def __init__(self, parser: flags.ArgumentParser):
        self._parser = parser

    def parse(self, argument):
        name, colon, arg = argument.partition(":")
        try:
            path = config_file(name)
        except FileNotFoundError as e:  # a flag error: absl prints it as one line with the usage hint
            raise ValueError(str(e)) from None
        return self._parser.parse(path + colon + arg)

    def flag_type(self):
        return self._parser.flag_type()


def define_config_flag(
    name: str, default: str | None, help_string: str, lock_config: bool = True
) -> flags.FlagHolder:
    """``config_flags.DEFINE_config_file`` (``--name=FILE[:arg]`` with ``--name.group.key=value`` overrides) whose
    value may also name a config shipped with the package (:func:`config_file`)."""
    if default is not None:
        name_default, colon, arg = default.partition(":")
        default = config_file(name_default) + colon + arg
    holder = config_flags.DEFINE_config_file(name, default, help_string, lock_config=lock_config)
    flag = flags.FLAGS[name]
    flag.parser = _ConfigFileParser(flag.parser)
    return holder
