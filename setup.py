"""Builds casmo_ext._C: the fused CPU kernel always, the CUDA kernels when nvcc and a
CUDA build of PyTorch are both present (set CASMO_NO_CUDA=1 to skip them).

    pip install -e . --no-build-isolation      # torch must already be installed

In the repository's .venv (made by `make install`) plain `pip install -e .` works too:
.venv/pip.conf turns build isolation off there.
"""

import os
import platform
import shutil
import sys

from setuptools import find_packages, setup

# torch.utils.cpp_extension reads CUDA_HOME when imported; its guess from an nvcc
# wrapper on PATH can be wrong, so prefer the standard install location.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    # pip builds in an isolated environment, which cannot see an installed torch.
    sys.exit(
        "casmo_ext: building needs torch importable (pip's build isolation hides an installed "
        "one): install torch, then run: pip install -e . --no-build-isolation"
    )

CSRC = os.path.join("casmo_ext", "csrc")
# No errno and no FP traps: results are unchanged, and GCC can then vectorise sqrt and
# the clamps of the CPU kernel's loops. ATen's parallel_for is inline OpenMP: without
# -fopenmp it compiles to a serial loop.
CXX_FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-pthread"]
LINK_FLAGS = ["-fopenmp"]
# casmo_cpu_kernel.cpp is compiled once per CPU capability, as ATen compiles its kernels
# (same macros, same instruction sets); casmo_cpu.cpp picks one at run time from the
# capability torch reports. Keep in step with casmo_cpu_kernel.h.
CPU_KERNEL = os.path.join(CSRC, "casmo_cpu_kernel.cpp")
X86_CAPABILITIES = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
}
IS_X86 = platform.machine().lower() in ("x86_64", "amd64")
CPU_CAPABILITIES = X86_CAPABILITIES if IS_X86 else {"DEFAULT": []}


class BuildWithCpuCapabilities(BuildExtension):
    """Compiles the CPU kernel once per capability, each with its own flags (an extension
    has one set), and links the objects into the extension."""

    def build_extension(self, ext) -> None:
        for capability, isa_flags in CPU_CAPABILITIES.items():
            macros = [f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}"]
            ext.extra_objects += self.compiler.compile(
                [CPU_KERNEL],
                output_dir=os.path.join(self.build_temp, capability),
                include_dirs=ext.include_dirs,
                extra_postargs={"cxx": ext.extra_compile_args["cxx"] + macros + isa_flags},
            )
        super().build_extension(ext)


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
    cmdclass={"build_ext": BuildWithCpuCapabilities.with_options(use_ninja=bool(shutil.which("ninja")))},
    python_requires=">=3.9",
    install_requires=["torch"],
)
