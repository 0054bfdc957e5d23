"""The architecture contract (pyproject.toml's [tool.importlinter]): data flows one way through the layers, and the
package has no import cycles. `lint-imports` runs in CI; these tests show that it passes on the package and fails
on a deliberately wrong import, and that no import hides inside a function without saying why."""

import ast
import os
import pathlib
import shutil
import subprocess
import sys

from conftest import ROOT

LINT = [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()"]


def _lint(package_parent: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": package_parent}
    return subprocess.run(
        LINT + [os.path.join(ROOT, "pyproject.toml"), "--no-cache"],
        cwd=package_parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_package_keeps_its_layers_and_has_no_cycles():
    out = _lint(ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "2 kept, 0 broken" in out.stdout


def test_an_upward_import_and_a_cycle_break_the_contract(tmp_path):
    """A copy of the package in which the factories (``build``) import the training loop that imports them: the
    layers and the no-cycle contract both break, naming the import; so does the ground floor importing evaluation."""
    shutil.copytree(os.path.join(ROOT, "diffseg_jax"), tmp_path / "diffseg_jax")
    build = tmp_path / "diffseg_jax" / "build.py"
    build.write_text(build.read_text() + "\nfrom diffseg_jax import train  # deliberately wrong\n")
    out = _lint(str(tmp_path))
    assert out.returncode != 0
    assert "0 kept, 2 broken" in out.stdout, out.stdout[-3000:]
    assert "diffseg_jax.build -> diffseg_jax.train" in out.stdout
    build.write_text(build.read_text().replace("from diffseg_jax import train  # deliberately wrong", ""))
    metrics = tmp_path / "diffseg_jax" / "metrics.py"
    metrics.write_text(metrics.read_text() + "\nfrom diffseg_jax import evaluate  # deliberately wrong\n")
    out = _lint(str(tmp_path))
    assert out.returncode != 0 and "diffseg_jax.metrics -> diffseg_jax.evaluate" in out.stdout


def test_function_local_imports_of_the_package_say_why():
    """An import of ours inside a function is allowed only with a comment giving its reason (on its line or the
    line above): never as an unexplained way around an import cycle."""
    unexplained = []
    for path in sorted(pathlib.Path(ROOT, "diffseg_jax").rglob("*.py")):
        lines = path.read_text(encoding="utf-8").split("\n")
        for fn in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (
                    node.level or (node.module or "").startswith("diffseg_jax")
                ):
                    line, above = lines[node.lineno - 1], lines[node.lineno - 2].strip()
                    reason = (
                        line.split("#", 1)[1].replace("noqa: PLC0415", "").strip(" —-") if "#" in line else ""
                    )
                    if not reason and not above.startswith("#"):
                        unexplained.append(f"{path.relative_to(ROOT)}:{node.lineno}: {line.strip()}")
    assert not unexplained, "function-local imports without a reason:\n" + "\n".join(unexplained)
