"""`pip install '.[agent]'` into an empty venv: no torch, fastapi or sqlalchemy, and the agent imports."""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("torch", "fastapi", "sqlalchemy", "onnx", "uvicorn", "alembic", "starlette")


@pytest.mark.integration
def test_agent_extra_installs_without_heavy_dependencies(tmp_path: Path) -> None:
    # Build from a copy of the sources, so the install cannot see (or write into) the work tree.
    src = tmp_path / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "*.egg-info", "__pycache__", ".demo", "bench", "tests", ".*cache"
        ),
    )
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    install = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", f"{src}[agent]"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    listed = subprocess.run(
        [str(py), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True, check=True
    )
    installed = {line.split("==")[0].lower() for line in listed.stdout.splitlines()}
    assert not installed & set(FORBIDDEN), installed & set(FORBIDDEN)
    probe = (
        "import sys, pkgutil, importlib, device_agent\n"
        "for m in pkgutil.walk_packages(device_agent.__path__, 'device_agent.'):\n"
        "    importlib.import_module(m.name)\n"
        f"bad = [m for m in {FORBIDDEN!r} if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    done = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    cli = subprocess.run([str(env_dir / "bin" / "edgeota"), "--help"], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert "agent" in cli.stdout
    assert sys.version_info >= (3, 11)
