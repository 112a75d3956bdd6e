"""casmo_ext: the CASMO optimizer as fused C++/CUDA kernels for PyTorch."""

from casmo_ext._kernels import build_info
from casmo_ext.optimizer import CASMO
from casmo_ext.reference import casmo_step_reference

__all__ = ["CASMO", "build_info", "casmo_step_reference"]
__version__ = "0.1.0"
