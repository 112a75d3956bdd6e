"""Finds the compiled kernels (casmo_ext._C), registers the fake (meta) kernel of their
operator torch.ops.casmo_ext.step_, and says what was built."""

from __future__ import annotations

import warnings

import torch

try:
    from casmo_ext import _C
except ImportError as error:  # built without the extension, or for another torch
    _C = None
    _IMPORT_ERROR: ImportError | None = error
else:
    _IMPORT_ERROR = None
# Read once: torch.compile cannot trace a call into the pybind module.
CUDA_KERNEL_BUILT = bool(_C is not None and _C.built_with_cuda())

if _C is not None:

    @torch.library.register_fake("casmo_ext::step_")
    def _step_fake(params, grads, m, s, steps, step_tensors, lr, lr_tensor, *hyper_and_scaling):
        """What the step returns (its float64 [sum agar_i, sum C_i] on the tensors' device),
        for tracing: torch.compile, FakeTensor and meta tensors."""
        device = params[0].device if params else torch.device("cpu")
        return torch.empty(2, dtype=torch.float64, device=device)


BUILD_HINT = (
    "build them with `pip install -e . --no-build-isolation` in the repository "
    "(or run `make test`, which does it)"
)
_warned = False


def build_info() -> dict:
    """What this installation has compiled in."""
    info = {
        "cpu_kernel": _C is not None,
        "cuda_kernel": CUDA_KERNEL_BUILT,
        "cuda_emulation": bool(_C is not None and hasattr(_C, "cuda_emulated_step")),
        # The CPU kernel's compiled variant in use (from torch's CPU capability).
        "cpu_kernel_capability": _C.cpu_capability() if _C is not None else None,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
    if _IMPORT_ERROR is not None:
        info["import_error"] = str(_IMPORT_ERROR)
    return info


def warn_fallback_once(reason: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"casmo_ext: {reason}; CASMO falls back to the pure-PyTorch step, "
            f"which is correct but many times slower. To get the fused kernels, {BUILD_HINT}.",
            RuntimeWarning,
            stacklevel=3,
        )
