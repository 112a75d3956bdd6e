"""How closely a kernel must match the pure-PyTorch reference, per parameter dtype.

float32 must match to float32 rounding. The 16-bit types store the moments in 16 bits:
a rounding flip (the kernels multiply by reciprocals where the reference divides, and
nvcc fuses multiply-adds) carries into later steps, where cancellation can leave an
element a few ulps of the tensor's scale off; hence an absolute tolerance relative to
the tensor's largest element."""

from __future__ import annotations

import torch

TOLERANCE = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=2e-2, atol=1e-4),
    torch.float16: dict(rtol=2e-2, atol=1e-4),
}
SCALED_ATOL = {torch.float32: 0.0, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def assert_matches_reference(actual: torch.Tensor, expected: torch.Tensor, dtype, name: str) -> None:
    actual, expected = actual.float(), expected.float()
    tolerance = dict(TOLERANCE[dtype])
    if expected.numel():
        tolerance["atol"] = max(tolerance["atol"], SCALED_ATOL[dtype] * expected.abs().max().item())
    torch.testing.assert_close(actual, expected, **tolerance, msg=lambda message: f"{name}: {message}")
