"""Faster CPU kernels for inference-time linear layers (no autograd).

Batch-1 decode is a string of matrix-vector products: it reads every weight once per token, so its speed
is the memory bandwidth a kernel reaches. On AVX2 machines torch's default BLAS path streams weights at
about half the machine's read bandwidth; gptlab picks, per call:

- `gemv.c` (ours, AVX2 + FMA) for up to `MAX_ROWS` rows with fp32 or bf16 row-major (out, in) weights,
  which is how gptlab.load lays out every family (GPT-2's Conv1D weights are transposed once there): batch-1
  decode, and an engine step's decode tokens.
  bf16 weights are half the bytes, and this works on CPUs without bf16 arithmetic, where torch emulates
  it: there gemv.c takes bf16 products of any row count (prefill too), 3-4x faster than the emulation. Compiled once with the system C compiler into the user cache (`$GPTLAB_CACHE`, else
  `$XDG_CACHE_HOME/gptlab`, else ~/.cache/gptlab) and loaded with ctypes; no compiler, another CPU or
  another OS: skipped.
- oneDNN's inner product (bundled with torch) for up to 128 rows, and for vocabulary-sized heads at any
  row count, where it beats the default path too.
- otherwise None: the caller uses F.linear.

`quant.c` (AVX2 + FMA) does the same few-row products for int8 / int4 weights (gptlab/models/quant.py,
`quant_linear`); `attention.c` reads decode attention in place from the paged KV cache.

`GPTLAB_KERNELS=0` turns all of this off (plain F.linear everywhere). `status()` says what is in use and
why; `gptlab info` prints it. bench/bench_inference.py measures the effect against transformers.
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

MAX_ROWS = 8  # rows gemv.c takes where torch's GEMMs have AVX-512 (or bf16 units): past that they win
AVX2_MAX_ROWS = 32  # on AVX2-only CPUs gemv.c's 4 x 3 tiles keep up with oneDNN to ~32 rows (GPT-2, Qwen3 shapes)
ONEDNN_MAX_ROWS = 128  # measured crossover with the default path for 768..3072-wide layers
LARGE_OUT = 8192  # vocabulary-sized heads: oneDNN is faster at every row count measured (up to 1024)
CFLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-fPIC", "-shared"]

_why_not: dict[str, str] = {}


def enabled() -> bool:
    return os.environ.get("GPTLAB_KERNELS", "1") != "0"


def cache_dir() -> Path:
    root = os.environ.get("GPTLAB_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gptlab"
    return Path(root) / "kernels"


def _build(name: str) -> ctypes.CDLL | None:
    """Build (once per source, flags and torch version) and load NAME.c; None, with the reason kept, if not here."""
    if not enabled():
        _why_not[name] = "GPTLAB_KERNELS=0"
        return None
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        _why_not[name] = f"needs Linux on x86-64 (this is {sys.platform}/{platform.machine()})"
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        _why_not[name] = f"needs AVX2 (torch reports {capability})"
        return None
    if "libgomp" not in Path("/proc/self/maps").read_text():
        _why_not[name] = "torch here does not use GNU OpenMP; a second OpenMP runtime would fight it for cores"
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        _why_not[name] = "no C compiler (set CC, or install gcc)"
        return None
    source = Path(__file__).with_name(f"{name}.c")
    key = hashlib.sha256(source.read_bytes() + " ".join(CFLAGS + [torch.__version__]).encode()).hexdigest()[:16]
    lib = cache_dir() / f"{name}-{key}.so"
    if not lib.exists():
        tmp = lib.with_name(f"{lib.name}.{os.getpid()}.tmp")
        try:
            lib.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run([compiler, *CFLAGS, str(source), "-o", str(tmp), "-lm"], check=True, capture_output=True,
                           text=True, timeout=120)
            os.replace(tmp, lib)  # atomic: a concurrent process sees no half-written library
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", None) or str(e)
            _why_not[name] = f"could not compile {source.name} with {compiler}: {detail.strip().splitlines()[-1]}"
            tmp.unlink(missing_ok=True)
            return None
    try:
        return ctypes.CDLL(str(lib))
    except OSError as e:
        _why_not[name] = f"could not load {lib}: {e}"
        return None


@functools.cache
def _gemv() -> ctypes.CDLL | None:
    cdll = _build("gemv")
    if cdll is not None:
        for fn in (cdll.gptlab_linear_f32, cdll.gptlab_linear_bf16):
            fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3
            fn.restype = None
    return cdll


@functools.cache
def _quant() -> ctypes.CDLL | None:
    cdll = _build("quant")
    if cdll is not None:
        for fn in (cdll.gptlab_linear_q8, cdll.gptlab_linear_q4):
            fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3
            fn.restype = None
    return cdll


QUANT_MAX_ROWS = 16  # rows quant.c takes (each reads the weights once more); past that, dequantize + GEMM wins


def quant_linear(x: torch.Tensor, kind: str, q: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor | None:
    """x @ dequant(q, scales).T + bias by quant.c (int8 / int4 weights), or None where it does not run here."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if x.device.type != "cpu" or not 0 < rows <= QUANT_MAX_ROWS or (lib := _quant()) is None:
        return None
    N = q.shape[0]
    K = x.shape[-1]
    xf = x.float().contiguous()
    bf = None if bias is None else bias.float().contiguous()
    y = torch.empty(*x.shape[:-1], N, dtype=torch.float32)
    fn = lib.gptlab_linear_q8 if kind == "int8" else lib.gptlab_linear_q4
    fn(xf.data_ptr(), q.data_ptr(), scales.data_ptr(), None if bf is None else bf.data_ptr(), y.data_ptr(),
       rows, N, K)
    return y.to(x.dtype)


@functools.cache
def _attention() -> ctypes.CDLL | None:
    cdll = _build("attention")
    if cdll is not None:
        fn = cdll.gptlab_paged_decode_f32
        fn.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 6 + [ctypes.c_float]
        fn.restype = None
    return cdll


def paged_decode(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor,
                 first: torch.Tensor, last: torch.Tensor, scale: float) -> torch.Tensor | None:
    """Decode attention read in place from a paged KV pool (attention.c), or None where it cannot run here
    (the caller gathers and uses SDPA). q (R, nh, hs); pools (blocks, bs, nkv, hs); tables (R, width);
    row r attends to positions first[r] .. last[r] - 1. Returns (R, nh, hs)."""
    lib = _attention()
    if lib is None or q.dtype != torch.float32 or k_pool.dtype != torch.float32 or q.device.type != "cpu" \
            or q.shape[-1] > 512 or q.shape[1] // k_pool.shape[2] > 16:
        return None
    R, nh, hs = q.shape
    _, bs, nkv, _ = k_pool.shape
    q = q.contiguous()
    tables, first, last = (t.to(torch.int64).contiguous() for t in (tables, first, last))
    out = torch.empty_like(q)
    lib.gptlab_paged_decode_f32(q.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), tables.data_ptr(),
                                first.data_ptr(), last.data_ptr(), out.data_ptr(), R, nh, nkv, hs, bs,
                                tables.shape[1], scale)
    return out


@functools.cache
def _onednn() -> bool:
    """Whether this torch build runs oneDNN's fp32 inner product (x86 and aarch64 builds do)."""
    if not enabled():
        _why_not["onednn"] = "GPTLAB_KERNELS=0"
        return False
    try:
        torch.ops.mkldnn._linear_pointwise(torch.ones(1, 2), torch.ones(3, 2), None, "none", [], "")
    except (AttributeError, RuntimeError) as e:
        _why_not["onednn"] = f"not in this torch build ({type(e).__name__})"
        return False
    return True


@functools.cache
def _max_rows() -> int:
    """fp32 rows gemv.c takes: more on AVX2-only CPUs, where torch's own GEMMs have no AVX-512 either."""
    return AVX2_MAX_ROWS if torch.backends.cpu.get_cpu_capability() == "AVX2" else MAX_ROWS


@functools.cache
def _native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); without it torch emulates bf16 matmuls
    several times slower than gemv.c reads bf16 weights, at any row count we measured (8 to 512)."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(p is None for p in probes):
        return True  # cannot tell: leave bf16 GEMMs to torch
    return any(p() for p in probes)


def _gemv_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lib: ctypes.CDLL) -> torch.Tensor:
    """gemv.c on fp32 activations (a few rows: converting them is cheap) and fp32 or bf16 weights."""
    N, K = weight.shape
    xf = x.float().contiguous()
    bf = None if bias is None else bias.float().contiguous()
    y = torch.empty(*x.shape[:-1], N, dtype=torch.float32)
    fn = lib.gptlab_linear_bf16 if weight.dtype == torch.bfloat16 else lib.gptlab_linear_f32
    fn(xf.data_ptr(), weight.data_ptr(), None if bf is None else bf.data_ptr(), y.data_ptr(), xf.numel() // K, N, K)
    return y.to(x.dtype)  # bf16: one rounding of the fp32 sum, as torch's own bf16 matmul does


def cpu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """x @ weight.T + bias by the fastest kernel here for this shape, or None (use F.linear).

    Call only without autograd (nothing here records a graph). Results agree with F.linear to float
    rounding (summation order differs).
    """
    dtype = weight.dtype
    if x.device.type != "cpu" or weight.dim() != 2 or x.dtype != dtype or (bias is not None and bias.dtype != dtype):
        return None
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    few = rows <= _max_rows()
    ours = few if dtype == torch.float32 else dtype == torch.bfloat16 and (rows <= MAX_ROWS or not _native_bf16())
    if ours and rows > 0 and weight.is_contiguous() and (lib := _gemv()) is not None:
        return _gemv_linear(x, weight, bias, lib)
    if dtype == torch.float32 and (rows <= ONEDNN_MAX_ROWS or weight.shape[0] >= LARGE_OUT) and _onednn():
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return None


def status() -> dict[str, str]:
    """{kernel: "in use" or the reason it is not}, building what is not yet built."""
    return {
        "attention": "in use (fp32 paged decode)" if _attention() else _why_not["attention"],
        "gemv": (f"in use (AVX2; fp32 up to {_max_rows()} rows, bf16 "
                 + (f"up to {MAX_ROWS} rows)" if _native_bf16() else "at any row count: this CPU has no bf16 arithmetic)"))
        if _gemv() else _why_not["gemv"],
        "onednn": "in use (fp32, up to %d rows and vocabulary heads)" % ONEDNN_MAX_ROWS if _onednn() else _why_not["onednn"],
        "quant": f"in use (AVX2; int8 / int4 weights, up to {QUANT_MAX_ROWS} rows)" if _quant() else _why_not["quant"],
    }


def summary() -> str:
    """`status()` on one line, as `gptlab info` and the benchmarks print it."""
    return "; ".join(f"{k}: {v}" for k, v in status().items())

