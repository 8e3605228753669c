"""What `pip install servegate` gives: `python -m build` makes a wheel (from its own sdist) that
installs in a fresh virtualenv, with its dependencies, and runs; the sdist installs too."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.upstreams.gunicorn import ROOT


@pytest.mark.time_limit(600)
def test_the_wheel_and_the_sdist_install_in_a_fresh_venv_and_run(tmp_path: Path) -> None:
    def run(*command: str | Path) -> str:
        # Never from the checkout, whose proxy/ would shadow the installed package.
        result = subprocess.run(
            [str(part) for part in command], capture_output=True, text=True, timeout=240,
            cwd=tmp_path,
        )  # fmt: skip
        assert result.returncode == 0, f"{command}: {result.stdout}\n{result.stderr}"
        return result.stdout

    dist = tmp_path / "dist"
    # Without --sdist or --wheel, build makes the sdist and then the wheel from it, so the wheel
    # also proves that the sdist holds everything the package needs.
    run(sys.executable, "-m", "build", "--outdir", dist, ROOT)
    [wheel] = dist.glob("servegate-*.whl")
    [sdist] = dist.glob("servegate-*.tar.gz")
    modules = {path.relative_to(ROOT).as_posix() for path in (ROOT / "proxy").rglob("*.py")}
    assert modules <= set(zipfile.ZipFile(wheel).namelist())

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python, servegate = venv / "bin" / "python", venv / "bin" / "servegate"
    # The test's own pip installs into the fresh venv, which needs no pip of its own.
    pip = [sys.executable, "-m", "pip", "--python", python, "install", "--quiet"]
    run(*pip, wheel)
    assert run(python, "-c", "import proxy; print(proxy.__file__)").startswith(str(venv))
    assert "usage: servegate" in run(servegate, "--help")
    assert "usage: servegate" in run(python, "-m", "proxy", "run", "--help")

    run(*pip, "--force-reinstall", "--no-deps", sdist)
    assert "usage: servegate" in run(servegate, "--help")
