"""The CASMO step of docs/casmo_spec.md in plain PyTorch: the executable spec every kernel
is tested against.

Written for clarity, one tensor at a time. It is also the fallback when the compiled
kernels are missing, and the path for dtypes the kernels do not cover (float64).
Arithmetic is float32 (or the parameter's dtype when wider); the moments are stored in
the parameter's dtype, and the AGAR of each coordinate is computed from the stored
moments, exactly as the kernels do.
"""

from __future__ import annotations

import torch


def casmo_step_reference(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    ms: list[torch.Tensor],
    ss: list[torch.Tensor],
    steps: list,
    *,
    lr,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    c_min: float,
    robustness: float,
    rel_floor: float,
) -> torch.Tensor:
    """Steps every tensor in place. `steps` holds each tensor's step count after this
    step (ints, or float tensors when capturable); `lr` is a float or a tensor.
    Returns float64 `[sum of agar_i, sum of C_i]` over all elements, on the device."""
    device = params[0].device if params else torch.device("cpu")
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for p, g, m, s, step in zip(params, grads, ms, ss, steps):
        if p.numel() == 0:
            continue
        compute_dtype = torch.promote_types(p.dtype, torch.float32)
        g32, m32, s32 = (t.to(compute_dtype) for t in (g, m, s))

        deviation = g32 - m32  # from the previous mean: taken before m moves
        m.copy_(beta1 * m32 + (1 - beta1) * g32)
        s.copy_(beta2 * s32 + (1 - beta2) * (deviation * deviation))

        bias_correction1 = _bias_correction(beta1, step, compute_dtype, device)
        bias_correction2 = _bias_correction(beta2, step, compute_dtype, device)
        m_hat = m.to(compute_dtype) / bias_correction1
        s_hat = s.to(compute_dtype) / bias_correction2
        signal = m_hat * m_hat
        total = signal + s_hat
        agar = signal / total.clamp(min=torch.finfo(torch.float32).tiny)

        agar_sum = agar.sum(dtype=torch.float64)
        agar_mean = agar_sum / agar.numel()
        trust = c_min + (1 - c_min) * agar_mean
        focus = (agar / (agar_mean.to(compute_dtype) + eps)).clamp(rel_floor, 1.0)
        confidence = trust.pow(robustness).to(compute_dtype) * focus

        p32 = p.to(compute_dtype)
        update = lr * confidence * m_hat / (total.sqrt() + eps)
        p.copy_(p32 * (1 - lr * weight_decay) - update)
        totals += torch.stack((agar_sum, confidence.sum(dtype=torch.float64)))
    return totals


def _bias_correction(beta: float, step, dtype: torch.dtype, device: torch.device):
    """1 - beta^t, computed in float64 (a tensor when the step count is one)."""
    if isinstance(step, torch.Tensor):
        return (1 - beta ** step.to(torch.float64)).to(dtype)
    return 1 - beta**step
