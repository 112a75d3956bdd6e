"""The DCGAN's speed settings chosen per machine: `--amp auto` and `--channels-last` left unset.

A speed setting is a property of the machine. bf16 autocast made one DCGAN step 1.9x
faster on an AMX Xeon and 20x slower on an AVX2 EPYC, where oneDNN has no fast bf16
convolution (docs/speed.md). So `auto` asks torch what the device computes natively
instead of trusting one machine's measurement."""

from __future__ import annotations

import argparse
import platform

import torch

# One DCGAN forward+backward of G and D at batch 16, one thread, on a 2-core AMD EPYC (Zen 3,
# AVX2 only), 2026-12-06: fp32 839 ms, bf16 autocast 17,192 ms.
EMULATED_BF16_SLOWDOWN = "20x"


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether `device` computes bfloat16 in hardware, and what torch reported."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "no CUDA device here"
        supported = torch.cuda.is_bf16_supported(including_emulation=False)
        return supported, f"{torch.cuda.get_device_name(device)}: bf16 {'' if supported else 'not '}supported"
    if device.type != "cpu":
        return False, f"no bf16 rule for {device.type}"
    if platform.machine().lower() in ("x86_64", "amd64"):
        # oneDNN also runs bf16 on plain AVX-512 by emulation, slower than fp32: only
        # AVX512-BF16 or AMX units make it fast.
        avx512_bf16, amx = torch.cpu._is_avx512_bf16_supported(), torch.cpu._is_amx_tile_supported()
        return avx512_bf16 or amx, f"CPU AVX512-BF16 {avx512_bf16}, AMX {amx}"
    supported = _arm_bf16_supported()
    return supported, f"CPU ({platform.machine()}) bf16 instructions {supported}"


def _arm_bf16_supported() -> bool:
    # On ARM oneDNN reports bf16 only where the CPU has the BF16 instructions (Neoverse V1/V2).
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve(args: argparse.Namespace, device: torch.device) -> dict:
    """Sets `args.amp` from 'auto' and `args.channels_last` from None (unset) for `device`;
    returns what was asked, what was chosen and why, for config.json. An explicit --amp bf16
    on a device without native bf16 runs after a one-line warning."""
    bf16, why = native_bf16(device)
    asked = {"amp": args.amp, "channels_last": args.channels_last}
    if args.amp == "auto":
        args.amp = "bf16" if bf16 else "off"
    elif args.amp == "bf16" and not bf16:
        print(
            f"warning: --amp bf16 on a device without native bf16 ({why}) is emulated, up to "
            f"{EMULATED_BF16_SLOWDOWN} slower than fp32 (docs/speed.md); --amp auto picks fp32 here"
        )
    if args.channels_last is None:
        # On the CPU channels_last was as fast as or faster than the default layout on both
        # CPU kinds measured, except under emulated bf16 (docs/speed.md); GPUs: not measured.
        args.channels_last = device.type == "cpu" and (args.amp != "bf16" or bf16)
    chosen = {"amp": args.amp, "channels_last": args.channels_last}
    return {"asked": asked, "chosen": chosen, "native_bf16": bf16, "why": why}
