"""The CASMO step of docs/casmo_spec.md in float64 NumPy, written independently of the
package: what the reference and every kernel are measured against."""

from __future__ import annotations

import numpy as np

FLT_MIN = np.finfo(np.float32).tiny


def spec_step(p, g, m, s, t, *, lr, beta1, beta2, eps, weight_decay, c_min, robustness, rel_floor):
    """One step of one tensor. Returns (p, m, s, sum of agar_i, sum of C_i)."""
    d = g - m
    m = beta1 * m + (1 - beta1) * g
    s = beta2 * s + (1 - beta2) * d * d
    m_hat = m / (1 - beta1**t)
    s_hat = s / (1 - beta2**t)
    signal = m_hat * m_hat
    total = signal + s_hat
    agar = signal / np.maximum(total, FLT_MIN)
    if agar.size == 0:
        return p, m, s, 0.0, 0.0
    mean = agar.mean()
    trust = c_min + (1 - c_min) * mean
    focus = np.clip(agar / (mean + eps), rel_floor, 1.0)
    confidence = trust**robustness * focus
    p = p * (1 - lr * weight_decay) - lr * confidence * m_hat / (np.sqrt(total) + eps)
    return p, m, s, agar.sum(), confidence.sum()


class SpecOptimizer:
    """Float64 twin of an optimizer's param_groups: same groups, same defaults."""

    DEFAULTS = dict(
        lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, c_min=0.1, robustness=0.5, rel_floor=0.1
    )

    def __init__(self, groups: list[dict], defaults: dict):
        self.groups = []
        for group in groups:
            hyper = {**self.DEFAULTS, **defaults, **{k: v for k, v in group.items() if k != "params"}}
            params = [np.asarray(p.detach().double().cpu().numpy()) for p in group["params"]]
            self.groups.append({"hyper": hyper, "params": params, "state": [None] * len(params)})
        self.metrics = {}

    def step(self, grads: list[list]):
        """grads: per group, per parameter, a float64 array or None (skipped)."""
        for gi, (group, group_grads) in enumerate(zip(self.groups, grads)):
            h = dict(group["hyper"])
            beta1, beta2 = h.pop("betas")
            agar_sum = conf_sum = 0.0
            count = 0
            for i, g in enumerate(group_grads):
                if g is None:
                    continue
                p = group["params"][i]
                state = group["state"][i] or {"t": 0, "m": np.zeros_like(p), "s": np.zeros_like(p)}
                state["t"] += 1
                p, state["m"], state["s"], a, c = spec_step(
                    p, g, state["m"], state["s"], state["t"], beta1=beta1, beta2=beta2, **h
                )
                group["params"][i], group["state"][i] = p, state
                agar_sum, conf_sum, count = agar_sum + a, conf_sum + c, count + p.size
            if count:
                self.metrics[gi] = (agar_sum / count, conf_sum / count)
