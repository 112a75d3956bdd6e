"""--amp auto and an unset --channels-last, decided from what torch reports of the machine."""

import argparse
import platform

import pytest
import torch

import speed_settings


def fake_cpu(monkeypatch, machine: str, avx512_bf16=False, amx=False, arm_bf16=False) -> None:
    """A CPU whose capability queries answer as given (the queries torch itself uses)."""
    monkeypatch.setattr(platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(speed_settings, "_arm_bf16_supported", lambda: arm_bf16)


def resolved(amp="auto", channels_last=None) -> tuple[argparse.Namespace, dict]:
    args = argparse.Namespace(amp=amp, channels_last=channels_last)
    return args, speed_settings.resolve(args, torch.device("cpu"))


def test_auto_is_fp32_and_channels_last_on_an_x86_cpu_without_bf16_units(monkeypatch):
    fake_cpu(monkeypatch, "x86_64")  # an AVX2 EPYC (Zen 3): torch reports neither unit
    args, record = resolved()
    assert (args.amp, args.channels_last) == ("off", True)
    assert record["asked"] == {"amp": "auto", "channels_last": None}
    assert record["chosen"] == {"amp": "off", "channels_last": True}
    assert record["native_bf16"] is False and "AVX512-BF16 False, AMX False" in record["why"]


@pytest.mark.parametrize("units", [{"avx512_bf16": True}, {"amx": True}])
def test_auto_is_bf16_where_x86_has_native_bf16(monkeypatch, units):
    fake_cpu(monkeypatch, "x86_64", **units)
    args, record = resolved()
    assert (args.amp, args.channels_last) == ("bf16", True)
    assert record["native_bf16"] is True


@pytest.mark.parametrize("arm_bf16, amp", [(True, "bf16"), (False, "off")])
def test_auto_on_arm_follows_the_bf16_instructions(monkeypatch, arm_bf16, amp):
    fake_cpu(monkeypatch, "aarch64", arm_bf16=arm_bf16, avx512_bf16=True)  # x86 queries ignored
    args, _ = resolved()
    assert args.amp == amp


def test_explicit_bf16_without_native_units_warns_once_and_keeps_the_default_layout(monkeypatch, capsys):
    fake_cpu(monkeypatch, "x86_64")
    args, _ = resolved(amp="bf16")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: --amp bf16") and "20x slower" in lines[0]
    # channels_last made emulated bf16 slower still (30x against 20x on the EPYC).
    assert (args.amp, args.channels_last) == ("bf16", False)


def test_explicit_settings_are_kept(monkeypatch, capsys):
    fake_cpu(monkeypatch, "x86_64", amx=True)
    args, record = resolved(amp="off", channels_last=False)
    assert (args.amp, args.channels_last) == ("off", False)
    assert record["asked"] == record["chosen"] and capsys.readouterr().out == ""


def test_cuda_without_a_gpu_is_not_native_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert speed_settings.native_bf16(torch.device("cuda")) == (False, "no CUDA device here")
