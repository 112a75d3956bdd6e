"""What the CPU tests step with: the build's kernels where present, and every backend
of CASMO as pytest parameters."""

import pytest

import casmo_ext

needs_kernel = pytest.mark.skipif(not casmo_ext.build_info()["cpu_kernel"], reason="casmo_ext._C not built")
needs_emulation = pytest.mark.skipif(
    not casmo_ext.build_info()["cuda_emulation"], reason="built without the CUDA emulation"
)
BACKENDS = [
    pytest.param(dict(fused=True), marks=needs_kernel, id="kernel"),
    pytest.param(dict(fused=False), id="foreach"),
    pytest.param(dict(fused=False, foreach=False), id="reference"),
]
