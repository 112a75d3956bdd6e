"""The CASMO step of docs/casmo_spec.md over a whole list of tensors with `torch._foreach_*`
ops: the fallback where no compiled kernel applies (float64, devices without a kernel,
`foreach=True`). It performs the reference's operations in the reference's order, one
multi-tensor launch per operation instead of one launch per tensor and operation."""

from __future__ import annotations

import torch


def casmo_step_foreach(
    params, grads, ms, ss, steps, *, lr, beta1, beta2, eps, weight_decay, c_min, robustness, rel_floor
) -> torch.Tensor:
    """As `casmo_step_reference` (same arguments and result), for tensors of one device
    and one dtype (the moments may be wider)."""
    device = params[0].device if params else torch.device("cpu")
    keep = [i for i, p in enumerate(params) if p.numel() > 0]
    if not keep:
        return torch.zeros(2, dtype=torch.float64, device=device)
    params, grads, ms, ss, steps = ([column[i] for i in keep] for column in (params, grads, ms, ss, steps))
    compute_dtype = torch.promote_types(params[0].dtype, torch.float32)

    def widened(tensors):
        return tensors if tensors[0].dtype == compute_dtype else [t.to(compute_dtype) for t in tensors]

    g32, m32, s32 = widened(grads), widened(ms), widened(ss)
    deviation = torch._foreach_sub(g32, m32)  # from the previous mean: taken before m moves
    new_m = torch._foreach_add(torch._foreach_mul(m32, beta1), torch._foreach_mul(g32, 1 - beta1))
    squared = torch._foreach_mul(deviation, deviation)
    new_s = torch._foreach_add(torch._foreach_mul(s32, beta2), torch._foreach_mul(squared, 1 - beta2))
    torch._foreach_copy_(ms, new_m)
    torch._foreach_copy_(ss, new_s)

    m_hat = torch._foreach_div(widened(ms), _bias_corrections(beta1, steps, compute_dtype))
    s_hat = torch._foreach_div(widened(ss), _bias_corrections(beta2, steps, compute_dtype))
    signal = torch._foreach_mul(m_hat, m_hat)
    total = torch._foreach_add(signal, s_hat)
    agar = torch._foreach_div(signal, torch._foreach_clamp_min(total, torch.finfo(torch.float32).tiny))

    # agar_i >= 0 (or NaN), so each tensor's L1 norm is its sum. The counts divide as
    # scalars: a tensor of them would be a copy from host memory, which CUDA graph
    # capture refuses (capturable).
    agar_norms = torch._foreach_norm(agar, 1, dtype=torch.float64)
    agar_sums = torch.stack(agar_norms)
    agar_means = torch.stack(torch._foreach_div(agar_norms, [float(a.numel()) for a in agar]))
    trust_pow = (c_min + (1 - c_min) * agar_means).pow(robustness).to(compute_dtype)
    focus = torch._foreach_div(agar, list((agar_means.to(compute_dtype) + eps).unbind()))
    torch._foreach_clamp_min_(focus, rel_floor)
    torch._foreach_clamp_max_(focus, 1.0)
    confidence = torch._foreach_mul(focus, list(trust_pow.unbind()))

    lr = lr.to(device) if isinstance(lr, torch.Tensor) else lr
    update = torch._foreach_mul(torch._foreach_mul(confidence, lr), m_hat)
    torch._foreach_div_(update, torch._foreach_add(torch._foreach_sqrt(total), eps))
    new_p = torch._foreach_sub(torch._foreach_mul(widened(params), 1 - lr * weight_decay), update)
    torch._foreach_copy_(params, new_p)
    confidence_sums = torch.stack(torch._foreach_norm(confidence, 1, dtype=torch.float64))
    return torch.stack((agar_sums.sum(), confidence_sums.sum()))


def _bias_corrections(beta: float, steps: list, dtype: torch.dtype) -> list:
    """1 - beta^t per tensor, computed in float64: floats, or 0-dim tensors when the
    step counts are tensors (capturable)."""
    if isinstance(steps[0], torch.Tensor):
        powers = torch._foreach_pow(beta, [s.to(torch.float64) for s in steps])
        return [(1 - power).to(dtype) for power in powers]
    return [1 - beta**step for step in steps]
