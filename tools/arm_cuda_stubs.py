"""Stub CUDA libraries, so that the CUDA build of torch that PyPI ships for aarch64 imports
on a machine without CUDA (tools/test_arm.sh runs it under qemu, where only its CPU side
is used).

The aarch64 torch wheel links libtorch_cpu.so, libtorch_cuda.so and torch._C against the
CUDA runtime and libraries (libcudart, libcublas, libcudnn, ...), which come from the
nvidia-* wheels: large, and not needed to run on the CPU. Python loads extension modules
with RTLD_NOW, so every symbol those libraries provide must resolve at import. This script
reads, with readelf, which libraries the wheel's ELF files need that neither the wheel nor
the system provides, and which of their symbols (with the symbol versions asked for) the
wheel uses; it writes for each such library a C file that defines every one of them as a
function returning a CUDA error (cudaErrorNoDevice, 100: cudaGetDeviceCount then reports no
GPU, so torch.cuda.is_available() is False) or, for the error-string functions, a message,
and compiles it with the cross compiler into a library of the same soname.

    python tools/arm_cuda_stubs.py SITE_PACKAGES SYSTEM_LIB_DIR OUT_DIR [--cc CC] [--readelf R]
"""

from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path

# Functions returning const char*: given a message instead of an error code.
STRING_FUNCTION = re.compile(
    r"^(cuda|cudnn|cublas|cublasLt|cusparse|cusparseLt|nvrtc|nccl)Get(Error|Status)(String|Name)$"
)
MESSAGE = "CUDA stub library (tools/arm_cuda_stubs.py): no CUDA on this machine"


def readelf(tool: str, *args: str) -> str:
    return subprocess.run([tool, "-W", *args], capture_output=True, text=True, check=True).stdout


def is_elf(path: Path) -> bool:
    with open(path, "rb") as file:
        return file.read(4) == b"\x7fELF"


def scan(tool: str, path: Path):
    """(needed libraries, {version: file it is asked of}, undefined non-weak symbols, defined names)."""
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", readelf(tool, "-d", str(path)))
    version_file, current = {}, None
    in_needs = False
    for line in readelf(tool, "-V", str(path)).splitlines():
        if line.startswith("Version needs section"):
            in_needs = True
        elif line.startswith("Version"):
            in_needs = False
        elif in_needs and (match := re.search(r"File: (\S+)", line)):
            current = match.group(1)
        elif in_needs and current and (match := re.search(r"Name: (\S+)", line)):
            version_file[match.group(1)] = current
    undefined, defined = set(), set()
    for line in readelf(tool, "--dyn-syms", str(path)).splitlines():
        fields = line.split()
        if len(fields) < 8 or not fields[0].rstrip(":").isdigit():
            continue
        bind, ndx, name = fields[4], fields[6], fields[7]
        if ndx == "UND":
            if name and bind != "WEAK":
                undefined.add(name)
        else:
            defined.add(name.split("@")[0])
    return needed, version_file, undefined, defined


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("site", type=Path, help="the site-packages holding torch")
    parser.add_argument("system_lib", type=Path, help="the target system's library folder")
    parser.add_argument("out", type=Path)
    parser.add_argument("--cc", default="aarch64-linux-gnu-gcc")
    parser.add_argument("--readelf", default="aarch64-linux-gnu-readelf")
    args = parser.parse_args()

    elfs = [
        path
        for path in sorted((args.site / "torch").rglob("*.so*"))
        if path.is_file() and not path.is_symlink() and is_elf(path)
    ]
    present = {path.name for path in elfs}
    scans = {path: scan(args.readelf, path) for path in elfs}
    defined = set().union(*(scanned[3] for scanned in scans.values()))

    def missing(library: str) -> bool:
        return library not in present and not (args.system_lib / library).exists()

    # Per missing library: its symbol versions, and the symbols asked of it.
    stubs: dict[str, dict[str, set[str]]] = {}
    for needed, version_file, undefined, _ in scans.values():
        absent = [library for library in needed if missing(library)]
        for library in absent:
            stubs.setdefault(library, {})
        for symbol in undefined:
            name, _, version = symbol.partition("@")
            if version:
                if missing(version_file.get(version, "")):
                    stubs[version_file[version]].setdefault(version, set()).add(name)
            elif name not in defined:
                # Unversioned: unknown which library provides it, so every missing one
                # that this file needs does (a duplicate definition is harmless).
                for library in absent:
                    stubs[library].setdefault("", set()).add(name)

    args.out.mkdir(parents=True, exist_ok=True)
    for library, versions in sorted(stubs.items()):
        names = sorted(set().union(*versions.values())) if versions else []
        source = [f"/* {library}: made by tools/arm_cuda_stubs.py */"]
        source.append(f'static const char message[] = "{MESSAGE}";')
        for name in names:
            if STRING_FUNCTION.match(name):
                source.append(f"const char *{name}(void) {{ return message; }}")
            else:
                source.append(f"long {name}(void) {{ return 100; }}")
        stem = args.out / library
        Path(f"{stem}.c").write_text("\n".join(source) + "\n")
        command = [args.cc, "-shared", "-fPIC", "-O1", "-w", f"-Wl,-soname,{library}"]
        command += ["-o", str(stem), f"{stem}.c"]
        named = sorted(version for version in versions if version)
        if named:
            # Each version node with its symbols; unversioned ones go in the first node.
            script = []
            for i, version in enumerate(named):
                symbols = versions[version] | (versions.get("", set()) if i == 0 else set())
                script.append(f"{version} {{ global: {' '.join(f'{s};' for s in sorted(symbols))} }};")
            Path(f"{stem}.map").write_text("\n".join(script) + "\n")
            command.append(f"-Wl,--version-script={stem}.map")
        subprocess.run(command, check=True)
        print(f"{library}: {len(names)} symbols", flush=True)
    if not stubs:
        print("no missing libraries: no stubs needed")


if __name__ == "__main__":
    main()
