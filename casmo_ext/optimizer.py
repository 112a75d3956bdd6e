"""casmo_ext.CASMO: a drop-in for the public `casmo.CASMO`, stepping each parameter
group with one fused kernel call per (device, dtype)."""

from __future__ import annotations

import math
import warnings
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
PARAM_DTYPES = (*KERNEL_DTYPES, torch.float64)  # float64 takes the fallback


def _validate(hp: dict) -> None:
    """Raises ValueError for an out-of-range hyper-parameter, worded as the public
    package words it."""
    lr, eps, (beta1, beta2) = hp["lr"], hp["eps"], hp["betas"]
    # Finite too: an infinite lr, eps or weight decay turns the parameters non-finite at once.
    if not 0.0 <= lr < math.inf:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps < math.inf:
        raise ValueError(f"Invalid epsilon: {eps}")
    if not 0.0 <= beta1 < 1.0:
        raise ValueError(f"Invalid beta1: {beta1}")
    if not 0.0 <= beta2 < 1.0:
        raise ValueError(f"Invalid beta2: {beta2}")
    if not 0.0 <= hp["weight_decay"] < math.inf:
        raise ValueError(f"Invalid weight_decay: {hp['weight_decay']}")
    if not 0.0 <= hp["c_min"] <= 1.0:
        raise ValueError(f"Invalid c_min: {hp['c_min']} (must be in [0, 1])")
    if not 0.0 <= hp["robustness"] < math.inf:
        raise ValueError(f"Invalid robustness: {hp['robustness']} (must be >= 0 and finite)")
    if not 0.0 <= hp["rel_floor"] <= 1.0:
        raise ValueError(f"Invalid rel_floor: {hp['rel_floor']} (must be in [0, 1])")
    if hp.get("differentiable"):
        raise NotImplementedError(
            "CASMO(differentiable=True) is not supported: the step runs under no_grad. "
            "Leave differentiable=False."
        )


def _check_param(p: torch.Tensor, state: Optional[dict]) -> None:
    """Raises ValueError for a parameter CASMO cannot step, or whose state does not fit it,
    before any step count or moment moves (as torch's optimizers refuse what they cannot do)."""
    if p.dtype not in PARAM_DTYPES:
        raise ValueError(
            f"CASMO steps float16, bfloat16, float32 and float64 parameters, not {p.dtype} (a parameter "
            f"of shape {tuple(p.shape)}); a complex parameter can be optimized as torch.view_as_real of it"
        )
    for key in ("m", "s"):
        moment = (state or {}).get(key)
        if isinstance(moment, torch.Tensor) and moment.shape != p.shape:
            raise ValueError(
                f"CASMO: the state '{key}' of a parameter of shape {tuple(p.shape)} has shape "
                f"{tuple(moment.shape)}; was the state dict of another model loaded?"
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

    Mixed precision: `torch.amp.GradScaler` hands step() its scale and found_inf, as to
    torch's fused Adam: the step unscales the gradients itself and skips (leaving
    parameters, state and group_metrics as they were) when found_inf is set; on a GPU
    without a host sync. `nan_guard` then leaves non-finite gradients to the scaler.
    Under torch.compile, step counts are tensors (an int would recompile every step);
    state_dict() still gives int `step`s, as the public package does.
    """

    # torch.amp.GradScaler sets `grad_scale` and `found_inf` on the optimizer before step().
    _step_supports_amp_scaling = True

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
        # Per group index (one key per group from the start, so torch.compile's guards on
        # this dict hold from step to step), per device: the float64 tensor [sum agar_i,
        # sum C_i, element count] of the group's last step. group_metrics() reads them.
        self._metrics: dict[int, dict[torch.device, torch.Tensor]] = {}
        # Whether a step count may be a Python int (torch.compile's _init_group needs tensors).
        self._int_steps = False
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        # Validated before torch appends it, so an invalid group is not kept.
        _validate({**self.defaults, **param_group})
        params = param_group["params"]
        if isinstance(params, torch.Tensor):
            param_group["params"] = [params]
        elif not isinstance(params, set):  # an iterator is read once; torch refuses a set itself
            param_group["params"] = list(params)
        for p in param_group["params"]:
            if isinstance(p, torch.Tensor):  # torch refuses anything else itself
                _check_param(p, None)
        super().add_param_group(param_group)
        self._metrics.setdefault(len(self.param_groups) - 1, {})

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
        for group_idx in range(len(self.param_groups)):
            self._metrics.setdefault(group_idx, {})
        # A checkpoint of the public package, or of an eager run, holds ints. A capturable
        # group takes them as device tensors now, as torch's Adam does: converted at its
        # first step instead, they would be converted inside a CUDA graph capture, and
        # the graph would reset them at every replay.
        for group in self.param_groups:
            if group["capturable"]:
                for p in group["params"]:
                    if "step" in self.state.get(p, {}):
                        _step_tensor(self.state[p], p.device)
        self._int_steps = any(isinstance(state.get("step"), int) for state in self.state.values())

    def state_dict(self) -> dict:
        packed = super().state_dict()
        # Step counts become tensors while compiling and under a GradScaler on a GPU;
        # checkpoints keep the public package's int (capturable groups keep tensors).
        for group in packed["param_groups"]:
            if group["capturable"]:
                continue
            for index in group["params"]:
                state = packed["state"].get(index)
                if state is not None and isinstance(state.get("step"), torch.Tensor):
                    packed["state"][index] = {**state, "step": int(state["step"].item())}
        return packed

    def group_metrics(self, group_idx: int = 0) -> dict[str, Optional[float]]:
        """The element-weighted mean AGAR and confidence of group `group_idx` at the
        last step it took (None before its first, or when its stepped tensors have no
        elements). This reads the device."""
        agar_sum = conf_sum = count = 0.0
        for totals in self._metrics.get(group_idx, {}).values():
            a, c, n = totals.tolist()
            agar_sum, conf_sum, count = agar_sum + a, conf_sum + c, count + n
        if count == 0:
            return {"agar": None, "confidence": None}
        return {"agar": agar_sum / count, "confidence": conf_sum / count}

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        self._check_not_captured()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        scaling = _GradScaling.of(self)
        stepping = []
        for group_idx, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse:
                    raise NotImplementedError(
                        "CASMO does not support sparse gradients. Use torch.optim.SparseAdam "
                        "for sparse scenarios, or densify with grad.to_dense()."
                    )
                _check_param(p, self.state.get(p))  # a dtype or a loaded state changed since
            if params:
                stepping.append((group_idx, group, params))
        # Every guarded gradient and every capturable lr is checked before anything moves,
        # so a failing step leaves all parameters and all state as they were. Under a
        # GradScaler, non-finite gradients are expected: its found_inf skips their step.
        for group_idx, group, params in stepping:
            if group["capturable"]:
                for device in {p.device for p in params}:
                    _lr_for(group, device)
            if group["nan_guard"] and scaling.found_inf is None:
                if not all(torch.isfinite(p.grad).all() for p in params):
                    raise RuntimeError(
                        f"Non-finite (NaN/Inf) gradient detected in parameter group {group_idx}. "
                        "Clip gradients (torch.nn.utils.clip_grad_norm_) or check the loss."
                    )
        for group_idx, group, _ in stepping:
            self._step_group(group_idx, group, scaling)
        return loss

    def _check_not_captured(self) -> None:
        """Host step counts would be frozen into a CUDA graph: refuse, as torch.optim does
        (not while compiling, where step counts are tensors)."""
        if torch.compiler.is_compiling() or not torch.cuda.is_available():
            return
        if all(group["capturable"] for group in self.param_groups):
            return
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "Attempting CUDA graph capture of step() for an instance of CASMO but "
                "param_groups' capturable is False; construct it with capturable=True."
            )

    def _gather_group(self, group: dict, params: list, grads: list, ms: list, ss: list, steps: list) -> None:
        """Appends each parameter with a gradient, its gradient and its state to the lists,
        creating the state on first use. Step counts are tensors on the parameter's device
        when capturable and while compiling."""
        tensor_steps = group["capturable"] or torch.compiler.is_compiling()
        if not tensor_steps:
            self._int_steps = True
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if len(state) == 0:
                _init_state(state, p, group, tensor_steps)
            if tensor_steps:
                _step_tensor(state, p.device)
            for column, value in zip(
                (params, grads, ms, ss, steps), (p, p.grad, state["m"], state["s"], state["step"])
            ):
                column.append(value)

    # torch.compile runs a method of this name eagerly while tracing, so the state it
    # creates is guarded as it will be at the next step (no recompile after the first).
    # Its tracer fails on int step counts, so with those the traced name is called: they
    # become tensors at the first compiled step, and the next one recompiles once.
    _init_group = _gather_group

    def _step_group(self, group_idx: int, group: dict, scaling: _GradScaling) -> None:
        columns = ([], [], [], [], [])
        if torch.compiler.is_compiling() and not self._int_steps:
            self._init_group(group, *columns)
        else:
            self._gather_group(group, *columns)
        buckets, copies = _buckets(columns, group["maximize"])
        totals: dict[torch.device, torch.Tensor] = {}
        for (device, dtype, moment_dtype), (ps, gs, ms, ss, steps) in buckets.items():
            grad_scale, found_inf = scaling.on(device)
            steps = self._advance_steps(ps, steps, group, device, found_inf)
            kernel_dtype = dtype if moment_dtype == dtype else None  # kernels take one dtype
            sums = self._dispatch(device, kernel_dtype, group, ps, gs, ms, ss, steps, grad_scale, found_inf)
            counted = torch.cat((sums, sums.new_full((1,), float(sum(p.numel() for p in ps)))))
            totals[device] = totals[device] + counted if device in totals else counted
        if scaling.grad_scale is not None:
            _write_back_unscaled(copies, group["maximize"])
        for device, counted in totals.items():
            found_inf = scaling.on(device)[1]
            if found_inf is not None:  # a skipped step keeps the group's last metrics
                previous = self._metrics.get(group_idx, {}).get(device, torch.zeros_like(counted))
                totals[device] = torch.where(found_inf != 0, previous, counted)
        self._metrics[group_idx] = totals

    def _advance_steps(self, params: list, steps: list, group: dict, device: torch.device, found_inf) -> list:
        """Each tensor's step count after this step, advanced in its state unless found_inf
        says the step is skipped. Float32 tensors on `device` when capturable, while
        compiling and under a GradScaler off the CPU (so skipping needs no host read); ints
        otherwise. `steps` are the counts as gathered (while compiling, already tensors)."""
        on_device = found_inf is not None and device.type != "cpu"
        if group["capturable"] or torch.compiler.is_compiling() or on_device:
            if not all(_is_step_tensor(step, device) for step in steps):
                steps = [_step_tensor(self.state[p], device) for p in params]
            torch._foreach_add_(steps, 1 if found_inf is None else (found_inf == 0).to(torch.float32))
            return steps
        taken = found_inf is None or not found_inf.item()  # a CPU tensor: no device to wait for
        states = [self.state[p] for p in params]
        for state in states:
            step = state["step"]
            if isinstance(step, torch.Tensor):  # from a capturable or compiled run
                step = int(step.item())
            state["step"] = step + int(taken)
        return [state["step"] for state in states]

    def _dispatch(self, device, dtype, group, ps, gs, ms, ss, steps, grad_scale, found_inf) -> torch.Tensor:
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
            return _fallback_step(fallback, ps, gs, ms, ss, steps, lr, hyper, grad_scale, found_inf)
        lr_tensor = lr if isinstance(lr, torch.Tensor) else None
        lr_value = 0.0 if lr_tensor is not None else float(lr)
        if isinstance(steps[0], torch.Tensor):
            step_floats, step_tensors = [], steps
        else:
            step_floats, step_tensors = [float(s) for s in steps], []
        return torch.ops.casmo_ext.step_(
            ps,
            gs,
            ms,
            ss,
            step_floats,
            step_tensors,
            lr_value,
            lr_tensor,
            *hyper.values(),
            grad_scale,
            found_inf,
        )

    def _use_kernel(self, device: torch.device, dtype: torch.dtype, foreach: Optional[bool]) -> bool:
        """Whether the fused kernel steps this bucket (else a fallback does)."""
        if self._fused is False or dtype not in KERNEL_DTYPES or (foreach and not self._fused):
            return False
        if _kernels._C is None:
            _kernels.warn_fallback_once(f"the compiled kernels are missing ({_kernels._IMPORT_ERROR})")
            return False
        if device.type == "cpu" or (device.type == "cuda" and _kernels.CUDA_KERNEL_BUILT):
            return True
        if self._fused:
            raise RuntimeError(
                f"CASMO(fused=True) has no kernel for {device.type} tensors in this build "
                f"(build_info: {_kernels.build_info()}); rebuild on a machine with nvcc."
            )
        _kernels.warn_fallback_once(f"this build has no kernel for {device.type} tensors")
        return False


def _buckets(columns: tuple, maximize: bool) -> tuple[dict, list]:
    """The gathered columns (params, grads, m, s, steps) split by (device, dtype, moment
    dtype), and the gradients that the step takes as copies (negated for maximize, or laid
    out as their parameter) as (gradient, copy) pairs."""
    buckets: dict[tuple, tuple] = {}
    copies = []
    for p, grad, m, s, step in zip(*columns):
        stepped = torch.neg(grad) if maximize else grad
        if stepped.stride() != p.stride():
            stepped = torch.empty_like(p).copy_(stepped)
        if maximize or stepped.stride() != grad.stride():
            copies.append((grad, stepped))
        bucket = buckets.setdefault((p.device, p.dtype, m.dtype), ([], [], [], [], []))
        for column, value in zip(bucket, (p, stepped, m, s, step)):
            column.append(value)
    return buckets, copies


def _write_back_unscaled(copies: list, maximize: bool) -> None:
    """Under a GradScaler the step unscales the gradients it takes in place, as torch's fused
    Adam does; a gradient taken as a copy gets the copy's values back (the values it had
    when found_inf skipped the step: the copy was then left as made)."""
    for grad, stepped in copies:
        if maximize:
            torch.neg(stepped, out=grad)
        else:
            grad.copy_(stepped)


def _init_state(state: dict, p: torch.Tensor, group: dict, tensor_steps: bool) -> None:
    # Made on the device, as torch's Adam makes them: no copy from host memory.
    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device) if tensor_steps else 0
    wide = group["float32_moments"] and p.dtype in (torch.bfloat16, torch.float16)
    moment_dtype = torch.float32 if wide else p.dtype
    state["m"] = torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.preserve_format)
    state["s"] = torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.preserve_format)


def _is_step_tensor(step, device: torch.device) -> bool:
    return isinstance(step, torch.Tensor) and step.device == device and step.dtype == torch.float32


def _step_tensor(state: dict, device: torch.device) -> torch.Tensor:
    """The state's step count as a float32 tensor on `device` (converted in place once).
    An int becomes a tensor by torch.full, a fill on the device: a copy from pageable host
    memory would synchronise, and CUDA graph capture refuses it."""
    step = state["step"]
    if _is_step_tensor(step, device):
        return step
    if isinstance(step, torch.Tensor):
        state["step"] = step.to(device=device, dtype=torch.float32)
    else:
        state["step"] = torch.full((), float(step), dtype=torch.float32, device=device)
    return state["step"]


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


def _fallback_step(fallback, ps, gs, ms, ss, steps, lr, hyper: dict, grad_scale, found_inf) -> torch.Tensor:
    """`fallback` (foreach or reference) under a GradScaler: it reads found_inf on the host
    (a device sync off the CPU) and unscales the gradients in place by multiplying, as
    GradScaler.unscale_ does."""
    if found_inf is not None and found_inf.item():
        return torch.zeros(2, dtype=torch.float64, device=ps[0].device)
    if grad_scale is not None:  # in place, as the kernels and torch's fused Adam unscale
        torch._foreach_mul_(gs, grad_scale.reciprocal())
    return fallback(ps, gs, ms, ss, steps, lr=lr, **hyper)


class _GradScaling:
    """What torch.amp.GradScaler set on the optimizer for this step: `grad_scale` (None
    once the user called unscale_) and `found_inf`, each on the device of the tensors it
    serves: copied without a sync to a GPU, as torch's fused Adam does, but with one to
    the CPU, where the step reads them on the host at once."""

    def __init__(self, grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor]):
        for name, value in (("grad_scale", grad_scale), ("found_inf", found_inf)):
            if value is not None and not (isinstance(value, torch.Tensor) and value.numel() == 1):
                raise TypeError(
                    f"CASMO: optimizer.{name} must be a one-element tensor (torch.amp.GradScaler "
                    f"sets it) or None, got {value!r}"
                )
        self.grad_scale, self.found_inf = grad_scale, found_inf
        self._per_device: dict[torch.device, tuple] = {}

    @classmethod
    def of(cls, optimizer: torch.optim.Optimizer) -> _GradScaling:
        return cls(getattr(optimizer, "grad_scale", None), getattr(optimizer, "found_inf", None))

    def on(self, device: torch.device) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        if device not in self._per_device:
            # The host reads a CPU copy at once: a non-blocking one may not have landed.
            non_blocking = device.type != "cpu"
            self._per_device[device] = tuple(
                None if t is None else t.to(device, torch.float32, non_blocking=non_blocking).reshape(())
                for t in (self.grad_scale, self.found_inf)
            )
        return self._per_device[device]
