"""Build of pyattn's compiled modules: setuptools hands the extensions to CMake (Ninja).

    pip install .                      # or: pip wheel . -w dist / pip install -e .
    pip install . --no-build-isolation # reuse this environment's pybind11, cmake, ninja

Environment variables read by this build (and only by it):

    PYATTN_DISABLE_CUDA=1         do not build pyattn._cuda even if nvcc is found
    PYATTN_CUDA_ARCHS="80;90a"    CUDA architectures (CMAKE_CUDA_ARCHITECTURES)
    CMAKE_BUILD_PARALLEL_LEVEL    parallel compile jobs (else MAX_JOBS, else all cores)
    MAX_JOBS
    CMAKE_ARGS                    extra arguments for the CMake configure step

pyattn._C (C++ CPU kernels) is always built. pyattn._cuda is built when CMake finds a
CUDA compiler (nvcc on PATH, $CUDACXX, or /usr/local/cuda) and PYATTN_DISABLE_CUDA is
not set; a machine without nvcc gets a working package without it.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    """A module that CMakeLists.txt builds (no sources for setuptools to compile)."""

    def __init__(self, name: str, optional: bool = False) -> None:
        super().__init__(name, sources=[], optional=optional)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() not in ("", "0", "false", "no", "off")


def _tool(module: str, attr: str, exe: str) -> str:
    """Path of cmake / ninja: the pip package's binary if installed, else PATH."""
    try:
        mod = __import__(module)
        path = Path(getattr(mod, attr)) / exe
        if path.exists():
            return str(path)
    except ImportError:
        pass
    found = shutil.which(exe)
    if found is None:
        raise RuntimeError(f"building pyattn needs {exe}: pip install {exe}")
    return found


def _parallel_jobs(requested: int | None) -> str:
    for var in ("CMAKE_BUILD_PARALLEL_LEVEL", "MAX_JOBS"):
        value = os.environ.get(var, "").strip()
        if value.isdigit() and int(value) > 0:
            return value
    if requested:
        return str(requested)
    return str(os.cpu_count() or 1)


class CMakeBuild(build_ext):
    def run(self) -> None:
        cmake_exts = [ext for ext in self.extensions if isinstance(ext, CMakeExtension)]
        if cmake_exts:
            built = self._cmake_build()
            # Drop the modules this configuration does not produce (pyattn._cuda without
            # nvcc), so that setuptools neither copies nor records them.
            for ext in cmake_exts:
                stale = Path(self.get_ext_fullpath(ext.name))
                if ext.name not in built and stale.exists():
                    stale.unlink()  # left in build/lib by an earlier build with CUDA
            self.extensions = [ext for ext in self.extensions
                               if not isinstance(ext, CMakeExtension) or ext.name in built]
            self._built = built
        super().run()

    def _cmake_build(self) -> dict[str, Path]:
        build_dir = Path(self.build_temp).resolve() / "cmake"
        out_dir = build_dir / "modules"
        build_dir.mkdir(parents=True, exist_ok=True)
        import pybind11

        cmake = _tool("cmake", "CMAKE_BIN_DIR", "cmake")
        ninja = _tool("ninja", "BIN_DIR", "ninja")
        with_cuda = not _truthy(os.environ.get("PYATTN_DISABLE_CUDA"))
        args = [
            cmake, "--fresh", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            # Fresh configure with an explicit make program: a cache left by an isolated
            # build would otherwise point at that build environment's deleted ninja.
            f"-DCMAKE_MAKE_PROGRAM={ninja}",
            "-DCMAKE_BUILD_TYPE=Debug" if self.debug else "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPYATTN_OUTPUT_DIR={out_dir}",
            f"-DPYATTN_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
        ]
        archs = os.environ.get("PYATTN_CUDA_ARCHS", "").strip()
        if archs:
            args.append(f"-DPYATTN_CUDA_ARCHS={archs}")
        args += shlex.split(os.environ.get("CMAKE_ARGS", ""))
        build = [cmake, "--build", str(build_dir), "-j", _parallel_jobs(self.parallel)]
        try:
            subprocess.run(args, check=True)
            subprocess.run(build, check=True)
        except subprocess.CalledProcessError:
            if not with_cuda:
                raise
            # pyattn._cuda is optional: a broken CUDA toolchain must not cost the CPU module.
            self.warn("building with CUDA failed (see above); building pyattn without pyattn._cuda")
            args[args.index("-DPYATTN_WITH_CUDA=ON")] = "-DPYATTN_WITH_CUDA=OFF"
            subprocess.run(args, check=True)
            subprocess.run(build, check=True)

        names = (build_dir / "pyattn_modules.txt").read_text().split()
        built = {}
        for ext in self.extensions:
            short = ext.name.rpartition(".")[2]
            if short in names:
                path = out_dir / Path(self.get_ext_filename(ext.name)).name
                if not path.exists():
                    raise RuntimeError(f"CMake did not produce {path}")
                built[ext.name] = path
        return built

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._built[ext.name], target)


setup(
    packages=(find_packages(include=["pyattn", "pyattn.*"])
              + ["pyattn.kernels"]
              + [f"pyattn.kernels.{p}" for p in find_packages(where="kernels")]),
    package_dir={"pyattn.kernels": "kernels"},
    ext_modules=[CMakeExtension("pyattn._C"), CMakeExtension("pyattn._cuda", optional=True)],
    cmdclass={"build_ext": CMakeBuild},
)
