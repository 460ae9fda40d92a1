"""The package builds into a wheel holding the compiled modules, and they import.

Builds with this environment's setuptools, pybind11, cmake and ninja
(`pip wheel . --no-deps --no-build-isolation`), about 30-60 s with CUDA, less without.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _cuda_expected() -> bool:
    """What CMake's check_language(CUDA) finds: $CUDACXX, else nvcc on PATH."""
    disabled = os.environ.get("PYATTN_DISABLE_CUDA", "").strip().lower() not in ("", "0", "false", "no", "off")
    cudacxx = os.environ.get("CUDACXX", "").strip()
    found = (bool(cudacxx) and shutil.which(cudacxx) is not None) or shutil.which("nvcc") is not None
    return found and not disabled


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                            "-w", str(out)], capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    wheels = list(out.glob("pyattn-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def unpacked(wheel, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(target)
    return target


def _run_python(code: str, path: Path, **env_vars: str) -> str:
    """Runs `code` in a fresh interpreter that imports pyattn from `path` (not the source tree)."""
    env = dict(os.environ, PYTHONPATH=str(path), **env_vars)
    result = subprocess.run([sys.executable, "-c", code], cwd=path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_wheel_contents(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("pyattn/_C.") and n.endswith(".so") for n in names), names
    assert "pyattn/kernels/__init__.py" in names
    has_cuda = any(n.startswith("pyattn/_cuda.") and n.endswith(".so") for n in names)
    assert has_cuda == _cuda_expected(), f"pyattn._cuda in wheel: {has_cuda}, nvcc found: {_cuda_expected()}"
    assert not wheel.name.endswith("-none-any.whl"), "a wheel with compiled modules must be platform-specific"


def test_cpu_module_imports_from_wheel(unpacked):
    out = _run_python(
        "import pyattn._C as C, pyattn.kernels, pyattn\n"
        "print(C.__file__); print(pyattn.kernels.__file__); print(C.supported_isas())\n",
        unpacked)
    c_file, kernels_file, isas = out.splitlines()
    assert c_file.startswith(str(unpacked)) and kernels_file.startswith(str(unpacked))
    assert "base" in isas


def test_cuda_module_imports_without_gpu(unpacked):
    if not _cuda_expected():
        pytest.skip("no nvcc at build time: pyattn._cuda is not built")
    # Hiding every GPU must not matter: static cudart, no CUDA call at import.
    out = _run_python(
        "import pyattn._cuda as G\n"
        "print(G.__file__); print(callable(G.softmax_forward)); print(G.cuda_archs)\n",
        unpacked, CUDA_VISIBLE_DEVICES="")
    cuda_file, has_fn, archs = out.splitlines()
    assert cuda_file.startswith(str(unpacked)) and has_fn == "True" and archs
