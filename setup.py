"""Builds casmo_ext._C: the fused CPU kernel always, the CUDA kernels when nvcc and a
CUDA build of PyTorch are both present (set CASMO_NO_CUDA=1 to skip them).

    pip install -e . --no-build-isolation      # torch must already be installed
"""

import os
import shutil

from setuptools import find_packages, setup

# torch.utils.cpp_extension reads CUDA_HOME when imported; its guess from an nvcc
# wrapper on PATH can be wrong, so prefer the standard install location.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)

CSRC = os.path.join("casmo_ext", "csrc")
# No errno and no FP traps: results are unchanged, and GCC can then vectorise sqrt and
# the clamps of the CPU kernel's loops. ATen's parallel_for is inline OpenMP: without
# -fopenmp it compiles to a serial loop.
CXX_FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-pthread"]
LINK_FLAGS = ["-fopenmp"]


def want_cuda() -> bool:
    if os.environ.get("CASMO_NO_CUDA") == "1":
        return False
    nvcc = CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    return bool(torch.version.cuda and nvcc)


def extension():
    sources = [os.path.join(CSRC, f) for f in ("casmo_cpu.cpp", "casmo_cuda_emulated.cpp")]
    sources = [path for path in sources if os.path.exists(path)]
    if not want_cuda():
        print("casmo_ext: building the CPU kernel only (no nvcc or no CUDA build of torch)")
        return CppExtension(
            "casmo_ext._C", sources, extra_compile_args={"cxx": CXX_FLAGS}, extra_link_args=LINK_FLAGS
        )
    if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        # No GPU to detect: build for Ampere and Hopper (plus PTX for newer GPUs)
        # rather than for every architecture torch knows.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
    print(
        f"casmo_ext: building the CPU and CUDA kernels (CUDA_HOME={CUDA_HOME}, "
        f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')})"
    )
    return CUDAExtension(
        "casmo_ext._C",
        sources + [os.path.join(CSRC, "casmo_cuda.cu")],
        define_macros=[("CASMO_WITH_CUDA", None)],
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": ["-O3", "-lineinfo"]},
        extra_link_args=LINK_FLAGS,
    )


setup(
    name="casmo_ext",
    version="0.1.0",
    description="The CASMO optimizer as fused C++/CUDA kernels for PyTorch",
    packages=find_packages(include=["casmo_ext", "casmo_ext.*"]),
    package_data={"casmo_ext": ["csrc/*.h", "csrc/*.cuh", "csrc/*.cpp", "csrc/*.cu"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
    python_requires=">=3.9",
    install_requires=["torch"],
)
