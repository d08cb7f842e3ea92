"""Which instruction set the kernels are built for, and building them (once) with the system C compiler.

The kernels are C sources with one code path per instruction set (`#if defined(__AVX512F__)` ...); each is
compiled for the best level this CPU runs, read from the CPU's feature flags at run time:

    avx2          AVX2 + FMA (x86-64 since 2013-2015)
    avx512        + AVX-512 F/BW/VL/DQ (Skylake-SP and later, AMD Zen 4 and later)
    avx512_vnni   + AVX512_VNNI: VPDPBUSD, int8 dot products (Cascade Lake, Ice Lake, Zen 4)
    avx512_bf16   + AVX512_BF16: VDPBF16PS, bf16 dot products in hardware (Cooper Lake, Sapphire Rapids, Zen 4)

`GPTLAB_ISA=avx2` (or `avx512`) caps the level, to compare paths on one machine (bench/bench_inference.py
--isa) or to work around a compiler that lacks a flag. Libraries go to the user cache (`$GPTLAB_CACHE`, else
`$XDG_CACHE_HOME/gptlab`, else ~/.cache/gptlab), keyed by source, flags and torch version, and are loaded
with ctypes. No compiler, another CPU or another OS: the kernel is skipped, with the reason kept.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch

# each level: the CPU flags (as /proc/cpuinfo spells them) it needs, and the compiler flags it adds
LEVELS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "avx2": (("avx2", "fma"), ("-mavx2", "-mfma")),
    "avx512": (("avx512f", "avx512bw", "avx512vl", "avx512dq"),
               ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq")),
    "avx512_vnni": (("avx512_vnni",), ("-mavx512vnni",)),
    "avx512_bf16": (("avx512_bf16",), ("-mavx512bf16",)),
}
BASE_FLAGS = ["-O3", "-fopenmp", "-fPIC", "-shared"]

why_not: dict[str, str] = {}  # kernel name -> why it is not in use


def enabled() -> bool:
    return os.environ.get("GPTLAB_KERNELS", "1") != "0"


def cache_dir() -> Path:
    root = os.environ.get("GPTLAB_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gptlab"
    return Path(root) / "kernels"


def level_for(flags: set[str] | frozenset[str], cap: str | None = None) -> str | None:
    """The best level whose CPU flags (and those of every level below it) are all in `flags`, at most `cap`."""
    best = None
    for name, (needs, _) in LEVELS.items():
        if not set(needs) <= flags:
            break
        best = name
        if name == cap:
            break
    return best


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@functools.cache
def isa() -> str | None:
    """The level the kernels are built for here (None: no level this machine and build can use)."""
    cap = os.environ.get("GPTLAB_ISA") or None
    if cap is not None and cap not in LEVELS:
        why_not["isa"] = f"GPTLAB_ISA={cap} is not one of {', '.join(LEVELS)}"
        return None
    level = level_for(cpu_flags(), cap)
    if level is None:
        why_not["isa"] = "this CPU has no AVX2 + FMA"
    return level


def compiler_flags(level: str) -> list[str]:
    flags = list(BASE_FLAGS)
    for name, (_, cflags) in LEVELS.items():
        flags += cflags
        if name == level:
            break
    return flags


def build(name: str, level: str | None = None) -> ctypes.CDLL | None:
    """Build (once per source, flags and torch version) and load NAME.c for `level` (default: isa());
    None, with the reason kept in why_not[name], where it cannot run here."""
    if not enabled():
        why_not[name] = "GPTLAB_KERNELS=0"
        return None
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        why_not[name] = f"needs Linux on x86-64 (this is {sys.platform}/{platform.machine()})"
        return None
    level = level or isa()
    if level is None:
        why_not[name] = why_not.get("isa", "no instruction set to build for")
        return None
    if "libgomp" not in Path("/proc/self/maps").read_text():
        why_not[name] = "torch here does not use GNU OpenMP; a second OpenMP runtime would fight it for cores"
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        why_not[name] = "no C compiler (set CC, or install gcc)"
        return None
    source = Path(__file__).with_name(f"{name}.c")
    flags = compiler_flags(level)
    text = source.read_bytes() + source.with_name("simd.h").read_bytes()  # the header every kernel includes
    key = hashlib.sha256(text + " ".join(flags + [torch.__version__]).encode()).hexdigest()[:16]
    lib = cache_dir() / f"{name}-{level}-{key}.so"
    if not lib.exists():
        tmp = lib.with_name(f"{lib.name}.{os.getpid()}.tmp")
        try:
            lib.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run([compiler, *flags, str(source), "-o", str(tmp), "-lm"], check=True, capture_output=True,
                           text=True, timeout=120)
            os.replace(tmp, lib)  # atomic: a concurrent process sees no half-written library
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", None) or str(e)
            why_not[name] = f"could not compile {source.name} with {compiler}: {detail.strip().splitlines()[-1]}"
            tmp.unlink(missing_ok=True)
            return None
    try:
        return ctypes.CDLL(str(lib))
    except OSError as e:
        why_not[name] = f"could not load {lib}: {e}"
        return None
