"""The package builds into a wheel holding the compiled modules, and they import.

Builds with this environment's setuptools, pybind11, cmake and ninja
(`pip wheel . --no-deps --no-build-isolation`), about 1-2 min with CUDA (one architecture), less without.
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


def _build_wheel(out: Path, **env_vars: str) -> Path:
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                            "-w", str(out)], capture_output=True, text=True, env=dict(os.environ, **env_vars))
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    wheels = list(out.glob("pyattn-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # One CUDA architecture is enough to check packaging, and halves the CUDA compile (~1 min on 2 cores).
    return _build_wheel(tmp_path_factory.mktemp("wheel"), PYATTN_CUDA_ARCHS=os.environ.get("PYATTN_CUDA_ARCHS") or "80")


@pytest.fixture(scope="module")
def unpacked(wheel, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(target)
    return target


def _run_python(code: str, path: Path, **env_vars: str) -> str:
    """Runs `code` in a fresh interpreter that imports pyattn from `path` (not the source tree)."""
    env = dict(os.environ, PYTHONPATH=str(path), **env_vars)
    # An editable install of pyattn in this environment would still answer for modules the
    # wheel lacks (its finder ignores the package path): take it out of the way.
    isolate = "import sys; sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
    result = subprocess.run([sys.executable, "-c", isolate + code], cwd=path, env=env, capture_output=True,
                            text=True)
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
        "import torch, pyattn._C as C, pyattn.kernels, pyattn\n"
        "print(C.__file__); print(pyattn.kernels.__file__); print(C.supported_isas())\n"
        "q = torch.randn(1, 2, 5, 8)\n"
        "out = pyattn.attention(q, q, q, causal=True, backend='cpu')\n"
        "print(torch.allclose(out, pyattn.reference.attention(q, q, q, causal=True), atol=1e-5))\n",
        unpacked)
    c_file, kernels_file, isas, same = out.splitlines()
    assert c_file.startswith(str(unpacked)) and kernels_file.startswith(str(unpacked))
    assert "base" in isas and same == "True"


def test_cpu_only_wheel_without_cuda(tmp_path):
    """PYATTN_DISABLE_CUDA=1 builds what a machine without nvcc gets: _C only, and a package that says why."""
    wheel = _build_wheel(tmp_path / "wheel", PYATTN_DISABLE_CUDA="1")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("pyattn/_C.") for n in names) and not any(n.startswith("pyattn/_cuda.") for n in names)
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(tmp_path / "site")
    out = _run_python("import pyattn; s = pyattn.backends(); print(s['cpu'].available); print(s['cuda'].reason)",
                      tmp_path / "site")
    cpu_ok, cuda_reason = out.splitlines()
    assert cpu_ok == "True" and "not built" in cuda_reason


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
