"""``import device_agent`` and every module in it work without torch, fastapi, sqlalchemy or onnx."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import device_agent

FORBIDDEN = ("torch", "fastapi", "sqlalchemy", "onnx", "starlette", "uvicorn", "alembic", "packager", "ota_server")


def test_agent_imports_stay_light() -> None:
    modules = sorted(m.name for m in pkgutil.walk_packages(device_agent.__path__, prefix="device_agent."))
    assert "device_agent.agent" in modules and "device_agent.update.executor" in modules
    code = (
        "import importlib, importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {FORBIDDEN!r}:\n"
        "            raise ImportError(f'blocked: {name}')\n"
        "sys.meta_path.insert(0, Block())\n"
        f"for name in ['device_agent', *{modules!r}]:\n"
        "    importlib.import_module(name)\n"
        "from device_agent import Agent\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_cli_module_imports_nothing_heavy() -> None:
    code = (
        "import sys, device_agent.cli\n"
        "heavy = [m for m in ('onnxruntime', 'numpy', 'paho') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_idle_agent_defers_numpy_and_onnxruntime() -> None:
    """No model yet, no numpy or ONNX Runtime in memory (they are ~40 MB of RSS together)."""
    code = (
        "import sys, device_agent.agent, device_agent.cli\n"
        "print(','.join(m for m in ('numpy', 'onnxruntime') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
