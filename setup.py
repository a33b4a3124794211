"""Build r1kernels._C with CMake + ninja.

The extension never includes torch headers (see ARCHITECTURE.md), so the build needs only a C++
compiler, and nvcc when the CUDA kernels are wanted. Environment switches:

  R1K_NO_CUDA=1            skip the CUDA sources even when nvcc is found
  R1K_CUDA_ARCHS=<list>    CUDA architectures, CMake CUDA_ARCHITECTURES syntax (default: csrc/cuda_build.json)
  R1K_BUILD_TYPE=Release   CMake build type
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


def _missing(tool: str, hint: str) -> RuntimeError:
    return RuntimeError(f"r1kernels build: {tool} was not found. {hint}")


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        cmake = shutil.which("cmake")
        if cmake is None:
            raise _missing("cmake", "Install it with `pip install cmake` (3.26 or newer).")
        if shutil.which("ninja") is None:
            raise _missing("ninja", "Install it with `pip install ninja`.")
        cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
        if cxx is None:
            raise _missing("a C++17 compiler", "Install g++ (Debian: `apt-get install g++`) or set CXX.")
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        nvcc = None if os.environ.get("R1K_NO_CUDA") == "1" else _find_nvcc()
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('R1K_BUILD_TYPE', 'Release')}",
            f"-DR1K_WITH_CUDA={'ON' if nvcc else 'OFF'}",
            "-G",
            "Ninja",
        ]
        if nvcc:
            args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
            if os.environ.get("R1K_CUDA_ARCHS"):  # else CMake's default, from csrc/cuda_build.json
                args.append(f"-DR1K_CUDA_ARCHS={os.environ['R1K_CUDA_ARCHS']}")
        print(f"r1kernels build: CUDA sources {'ON with ' + nvcc if nvcc else 'OFF'}", flush=True)
        try:
            subprocess.run([cmake, str(ROOT), *args], cwd=build_dir, check=True)
            subprocess.run([cmake, "--build", ".", "--parallel"], cwd=build_dir, check=True)
        except subprocess.CalledProcessError as err:
            raise RuntimeError(
                "r1kernels build: the C++/CUDA build failed (see the compiler output above). "
                "A ptxas 'spill' warning is an error by design; set R1K_NO_CUDA=1 to build the CPU part only."
            ) from err


def _find_nvcc() -> str | None:
    for candidate in (os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and Path(candidate).exists():
            return candidate
    return None


setup(ext_modules=[CMakeExtension("r1kernels._C")], cmdclass={"build_ext": CMakeBuild})
