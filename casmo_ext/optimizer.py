"""casmo_ext.CASMO: a drop-in for the public `casmo.CASMO`, stepping each parameter
group with one fused kernel call per (device, dtype)."""

from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Any, Callable, Optional

import torch

from casmo_ext import _kernels
from casmo_ext.foreach import casmo_step_foreach
from casmo_ext.reference import casmo_step_reference

# Keywords of the pre-0.4 calibration design: accepted, warned about, ignored.
RETIRED_KEYWORDS = (
    "tau_init_steps",
    "tau_clip_range",
    "granularity",
    "agar_clamp_factor",
    "total_steps",
)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _validate(hp: dict) -> None:
    """Raises ValueError for an out-of-range hyper-parameter, worded as the public
    package words it."""
    lr, eps, (beta1, beta2) = hp["lr"], hp["eps"], hp["betas"]
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon: {eps}")
    if not 0.0 <= beta1 < 1.0:
        raise ValueError(f"Invalid beta1: {beta1}")
    if not 0.0 <= beta2 < 1.0:
        raise ValueError(f"Invalid beta2: {beta2}")
    if not 0.0 <= hp["weight_decay"]:
        raise ValueError(f"Invalid weight_decay: {hp['weight_decay']}")
    if not 0.0 <= hp["c_min"] <= 1.0:
        raise ValueError(f"Invalid c_min: {hp['c_min']} (must be in [0, 1])")
    if not 0.0 <= hp["robustness"]:
        raise ValueError(f"Invalid robustness: {hp['robustness']} (must be >= 0)")
    if not 0.0 <= hp["rel_floor"] <= 1.0:
        raise ValueError(f"Invalid rel_floor: {hp['rel_floor']} (must be in [0, 1])")
    if hp.get("differentiable"):
        raise NotImplementedError(
            "CASMO(differentiable=True) is not supported: the step runs under no_grad. "
            "Leave differentiable=False."
        )


class CASMO(torch.optim.Optimizer):
    """Confidence-Adjusted Signal-to-noise Momentum optimizer (the 0.4 formulation).

    AdamW whose every coordinate's update is scaled by how consistent that coordinate's
    gradient has been. Same keywords, defaults, errors and state layout (`step`, `m`,
    `s`) as the public `casmo` package, so checkpoints move both ways.

    Args beyond the public package's, with torch.optim's meanings:
        capturable: keep the step counts (and accept `lr`) as device tensors so the step
            can be captured in a CUDA graph, as in `torch.optim.Adam`.
        fused: None (default) uses the compiled kernel where it is built and the
            `torch._foreach_*` fallback otherwise; True requires the kernel (raising where
            it is not built for the device), except for float64 tensors, which no kernel
            takes and the fallback steps; False never uses the kernel.
        foreach: where the kernel is not used, True or None (default) step with
            `torch._foreach_*` ops and False with the per-tensor reference. True also
            chooses the foreach path over the kernel; it cannot be combined with fused=True.
        maximize: ascend the objective (the step sees -grad), per group.
        float32_moments: keep `m` and `s` of bfloat16/float16 parameters in float32 (per
            group; default False, the public package's state). In 16 bits, `s` cannot
            shrink by the 0.1% per step of beta2 = 0.999 (under half an ulp). These
            tensors take the fallback (`foreach`): the kernels take one dtype per tensor.
        differentiable: only False; the step is not differentiable.
    """

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        c_min: float = 0.1,
        robustness: float = 0.5,
        rel_floor: float = 0.1,
        nan_guard: bool = False,
        *,
        capturable: bool = False,
        fused: Optional[bool] = None,
        foreach: Optional[bool] = None,
        maximize: bool = False,
        differentiable: bool = False,
        float32_moments: bool = False,
        **retired: Any,
    ):
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            c_min=c_min,
            robustness=robustness,
            rel_floor=rel_floor,
            nan_guard=nan_guard,
            capturable=capturable,
            foreach=foreach,
            maximize=maximize,
            differentiable=differentiable,
            float32_moments=float32_moments,
        )
        _validate(defaults)
        if fused and foreach:
            raise ValueError("CASMO: `fused` and `foreach` cannot both be True; pass one of them.")
        for key in retired:
            if key not in RETIRED_KEYWORDS:
                raise TypeError(f"CASMO got an unexpected keyword argument '{key}'")
            warnings.warn(
                f"CASMO: '{key}' is deprecated and ignored since v0.4.0 — CASMO no "
                "longer uses a calibration phase. See the migration guide.",
                DeprecationWarning,
                stacklevel=2,
            )
        if fused and _kernels._C is None:
            raise RuntimeError(
                f"CASMO(fused=True) needs the compiled kernels, which are missing "
                f"({_kernels._IMPORT_ERROR}); {_kernels.BUILD_HINT}."
            )
        self._fused = fused
        super().__init__(params, defaults)
        # Per group: the device tensors [sum agar_i, sum C_i] of the last step and the
        # element count. Kept on the device; group_metrics() reads them.
        self._metrics: dict[int, tuple[list[torch.Tensor], int]] = {}

    def add_param_group(self, param_group: dict) -> None:
        # Validated before torch appends it, so an invalid group is not kept.
        _validate({**self.defaults, **param_group})
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # torch casts every state tensor to its parameter's dtype: float32 moments of
        # 16-bit parameters (float32_moments) are put back from the checkpoint's values.
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for p, saved_id in zip(params, saved_ids):
            saved = state_dict["state"].get(saved_id, {})
            for key in ("m", "s"):
                value = saved.get(key)
                if isinstance(value, torch.Tensor) and value.dtype == torch.float32 != p.dtype:
                    self.state[p][key] = value.to(device=p.device, copy=True)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # Groups saved by the public package lack our own keys.
        for group in self.param_groups:
            for key in ("capturable", "nan_guard", "maximize", "differentiable", "float32_moments"):
                group.setdefault(key, False)
            group.setdefault("foreach", None)
        if not hasattr(self, "_metrics"):
            self._metrics = {}

    def group_metrics(self, group_idx: int = 0) -> dict[str, Optional[float]]:
        """The element-weighted mean AGAR and confidence of group `group_idx` at the
        last step it took (None before its first, or when its stepped tensors have no
        elements). This reads the device."""
        sums, count = self._metrics.get(group_idx, ([], 0))
        if count == 0:
            return {"agar": None, "confidence": None}
        agar_sum = conf_sum = 0.0
        for pair in sums:
            a, c = pair.tolist()
            agar_sum, conf_sum = agar_sum + a, conf_sum + c
        return {"agar": agar_sum / count, "confidence": conf_sum / count}

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        self._check_not_captured()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        stepping = []
        for group_idx, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse:
                    raise NotImplementedError(
                        "CASMO does not support sparse gradients. Use torch.optim.SparseAdam "
                        "for sparse scenarios, or densify with grad.to_dense()."
                    )
            if params:
                stepping.append((group_idx, group, params))
        # Every guarded gradient and every capturable lr is checked before anything moves,
        # so a failing step leaves all parameters and all state as they were.
        for group_idx, group, params in stepping:
            if group["capturable"]:
                for device in {p.device for p in params}:
                    _lr_for(group, device)
            if group["nan_guard"] and not all(torch.isfinite(p.grad).all() for p in params):
                raise RuntimeError(
                    f"Non-finite (NaN/Inf) gradient detected in parameter group {group_idx}. "
                    "Clip gradients (torch.nn.utils.clip_grad_norm_) or check the loss."
                )
        for group_idx, group, params in stepping:
            self._step_group(group_idx, group, params)
        return loss

    def _check_not_captured(self) -> None:
        """Host step counts would be frozen into a CUDA graph: refuse, as torch.optim does."""
        if all(group["capturable"] for group in self.param_groups) or not torch.cuda.is_available():
            return
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "Attempting CUDA graph capture of step() for an instance of CASMO but "
                "param_groups' capturable is False; construct it with capturable=True."
            )

    def _step_group(self, group_idx: int, group: dict, params: list[torch.Tensor]) -> None:
        capturable = group["capturable"]
        buckets: dict[tuple, list] = defaultdict(lambda: ([], [], [], [], []))
        for p in params:
            state = self.state[p]
            if len(state) == 0:
                _init_state(state, p, group)
            step = state["step"]
            if capturable:
                if not isinstance(step, torch.Tensor) or step.device != p.device:
                    step = state["step"] = torch.as_tensor(step, dtype=torch.float32, device=p.device)
            else:
                if isinstance(step, torch.Tensor):  # loaded from a capturable run
                    step = int(step.item())
                step = state["step"] = step + 1
            grad = torch.neg(p.grad) if group["maximize"] else p.grad
            if grad.stride() != p.stride():
                grad = torch.empty_like(p).copy_(grad)
            bucket = buckets[(p.device, p.dtype, state["m"].dtype)]
            for column, value in zip(bucket, (p, grad, state["m"], state["s"], step)):
                column.append(value)

        sums = []
        for (device, dtype, moment_dtype), (ps, gs, ms, ss, steps) in buckets.items():
            if capturable:
                torch._foreach_add_(steps, 1)
            kernel_dtype = dtype if moment_dtype == dtype else None  # kernels take one dtype
            sums.append(self._dispatch(device, kernel_dtype, group, ps, gs, ms, ss, steps))
        self._metrics[group_idx] = (sums, sum(p.numel() for p in params))

    def _dispatch(self, device, dtype, group, ps, gs, ms, ss, steps) -> torch.Tensor:
        beta1, beta2 = group["betas"]
        # In the kernels' argument order.
        hyper = dict(
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            c_min=group["c_min"],
            robustness=group["robustness"],
            rel_floor=group["rel_floor"],
        )
        lr = _lr_for(group, device)
        if not self._use_kernel(device, dtype, group["foreach"]):
            fallback = casmo_step_reference if group["foreach"] is False else casmo_step_foreach
            return fallback(ps, gs, ms, ss, steps, lr=lr, **hyper)
        scalars = hyper.values()
        if device.type == "cpu":
            steps_f = [float(s) for s in steps]
            return _kernels._C.cpu_step(ps, gs, ms, ss, steps_f, float(lr), *scalars)
        lr_tensor = lr if isinstance(lr, torch.Tensor) else None
        lr_value = 0.0 if lr_tensor is not None else float(lr)
        if group["capturable"]:
            return _kernels._C.cuda_step(ps, gs, ms, ss, [], steps, lr_value, lr_tensor, *scalars)
        steps_f = [float(s) for s in steps]
        return _kernels._C.cuda_step(ps, gs, ms, ss, steps_f, [], lr_value, lr_tensor, *scalars)

    def _use_kernel(self, device: torch.device, dtype: torch.dtype, foreach: Optional[bool]) -> bool:
        """Whether the fused kernel steps this bucket (else a fallback does)."""
        if self._fused is False or dtype not in KERNEL_DTYPES or (foreach and not self._fused):
            return False
        if _kernels._C is None:
            _kernels.warn_fallback_once(f"the compiled kernels are missing ({_kernels._IMPORT_ERROR})")
            return False
        if device.type == "cpu" or (device.type == "cuda" and _kernels._C.built_with_cuda()):
            return True
        if self._fused:
            raise RuntimeError(
                f"CASMO(fused=True) has no kernel for {device.type} tensors in this build "
                f"(build_info: {_kernels.build_info()}); rebuild on a machine with nvcc."
            )
        _kernels.warn_fallback_once(f"this build has no kernel for {device.type} tensors")
        return False


def _init_state(state: dict, p: torch.Tensor, group: dict) -> None:
    if group["capturable"]:
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
    else:
        state["step"] = 0
    wide = group["float32_moments"] and p.dtype in (torch.bfloat16, torch.float16)
    moment_dtype = torch.float32 if wide else p.dtype
    state["m"] = torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.preserve_format)
    state["s"] = torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.preserve_format)


def _lr_for(group: dict, device: torch.device):
    """The group's lr as the step on `device` takes it: a float, or a tensor on `device`
    when capturable (a graph cannot copy it in from elsewhere)."""
    lr = group["lr"]
    if not isinstance(lr, torch.Tensor) or lr.device == device:
        return lr
    if group["capturable"]:
        raise ValueError(
            f"CASMO(capturable=True) needs the lr tensor on the parameters' device ({device}), "
            f"not {lr.device}: pass lr=lr.to({str(device)!r})."
        )
    return lr.item()
