"""diffseg_jax.configlib: config files by path and by the name of a config shipped with the package, the --config
flag, and the installed layout (configs inside the package, no top-level `configs`)."""

import os
import pathlib
import subprocess
import sys

import pytest
from conftest import ROOT

from diffseg_jax import configlib

CONFIG_FILES = sorted(p.name for p in pathlib.Path(ROOT, "configs").glob("*.py"))


def _python(code: str, cwd, pythonpath: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": pythonpath}
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_a_config_loads_by_repository_path_and_by_shipped_name_from_any_directory(tmp_path, monkeypatch):
    by_path = configlib.load_config(os.path.join(ROOT, "configs", "e2_isic.py") + ":segdiff,tiny").to_dict()
    monkeypatch.chdir(tmp_path)  # no configs/ here
    assert configlib.load_config("e2_isic:segdiff,tiny").to_dict() == by_path
    assert configlib.load_config("e2_isic.py:segdiff,tiny").to_dict() == by_path
    # The README's repository paths work after `pip install` from any directory: the shipped config of that name.
    assert configlib.load_config("configs/e2_isic.py:segdiff,tiny").to_dict() == by_path
    assert by_path["model"]["name"] == "segdiff" and by_path["data"]["name"] == "isic2016"
    # A file of one's own, by path, is not shadowed by a shipped name.
    (tmp_path / "quickstart.py").write_text(
        "from diffseg_jax import defaults\n\ndef get_config(arg=None):\n"
        "    c = defaults.get_config(arg)\n    c.seed = 123\n    return c\n"
    )
    assert configlib.load_config("quickstart.py:tiny").seed == 123
    assert configlib.load_config("quickstart:tiny").seed == 0  # the shipped one by name
    with pytest.raises(FileNotFoundError, match=r"No config 'e9_isic'.*quickstart, table1_synthetic"):
        configlib.load_config("e9_isic:tiny")
    with pytest.raises(FileNotFoundError, match="other/e2_isic.py"):  # a path elsewhere is not guessed at
        configlib.load_config("other/e2_isic.py")


def test_the_config_flag_takes_a_shipped_name_with_overrides_and_names_an_unknown_one(tmp_path):
    code = (
        "import sys\nfrom absl import flags\nfrom diffseg_jax import configlib\n"
        "c = configlib.define_config_flag('config', None, 'a config')\n"
        "flags.FLAGS(['prog', *sys.argv[1:]])\n"
        "print(c.value.experiment, c.value.data.image_size, c.value.train.num_steps, c.value.is_locked)\n"
    )
    out = _python(code, tmp_path, ROOT, "--config=quickstart:tiny", "--config.train.num_steps=3")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["e2", "32", "3", "True"]
    bad = _python(code, tmp_path, ROOT, "--config=e9_isic:tiny")
    assert bad.returncode != 0
    assert "--config=e9_isic:tiny: No config 'e9_isic'" in bad.stderr and "e2_isic, e2_monuseg" in bad.stderr


def test_the_installed_package_holds_the_configs_and_no_top_level_configs(tmp_path):
    """The package as pip installs it (setuptools' build_py, which lays out a wheel's files, run offline on
    pyproject.toml): the configs sit in diffseg_jax/configs, nothing named `configs` at the top, every subpackage of
    the source tree is there; and from another directory that copy loads a shipped config by name."""
    lib = tmp_path / "site"
    build = subprocess.run(
        [
            sys.executable,
            "-c",
            "import setuptools; setuptools.setup()",
            "-q",
            # egg_info's file list into tmp_path: not written into the checkout, nor an old one there read instead
            *("egg_info", "--egg-base", str(tmp_path)),
            *("build_py", "--build-lib", str(lib)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    assert sorted(os.listdir(lib)) == ["diffseg_jax"]  # no top-level `configs` (nor anything else)
    assert sorted(p.name for p in (lib / "diffseg_jax" / "configs").glob("*.py")) == CONFIG_FILES
    source = {p.parent.relative_to(ROOT) for p in pathlib.Path(ROOT, "diffseg_jax").rglob("__init__.py")}
    built = {p.parent.relative_to(lib) for p in lib.rglob("__init__.py")}
    assert built == source | {pathlib.Path("diffseg_jax/configs")}  # pyproject's package list is complete
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = _python(
        "import diffseg_jax\nfrom diffseg_jax import configlib\n"
        "print(diffseg_jax.__file__)\nprint(configlib.shipped_config_dir())\n"
        "print(diffseg_jax.get_config('quickstart:tiny').data.image_size)",
        elsewhere,
        str(lib),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    package_file, config_dir, size = out.stdout.split()
    assert package_file == str(lib / "diffseg_jax" / "__init__.py")
    assert config_dir == str(lib / "diffseg_jax" / "configs") and size == "32"


def test_nothing_in_the_package_imports_the_top_level_configs():
    offenders = [
        str(path.relative_to(ROOT))
        for path in pathlib.Path(ROOT, "diffseg_jax").rglob("*.py")
        if "from configs import" in path.read_text(encoding="utf-8")
        or "import configs" in path.read_text(encoding="utf-8")
    ]
    assert not offenders
