"""Faster CPU kernels for inference-time linear layers and decode attention (no autograd).

Batch-1 decode is a string of matrix-vector products: it reads every weight once per token, so its speed
is the memory bandwidth a kernel reaches, and torch's default GEMM path streams weights well below it.
gptlab picks, per call:

- `gemv.c` (ours) for up to `MAX_ROWS` rows with fp32 or bf16 row-major (out, in) weights, which is how
  gptlab.load lays out every family (GPT-2's Conv1D weights are transposed once there): batch-1 decode, and
  an engine step's decode tokens. bf16 weights are half the bytes; on CPUs without bf16 arithmetic, where
  torch emulates it, gemv.c takes bf16 products of any row count (prefill too), 3-4x faster than the emulation.
- oneDNN's inner product (bundled with torch) for up to 128 fp32 rows, and for vocabulary-sized heads at any
  row count, where it beats the default path too.
- otherwise None: the caller uses F.linear.

`quant.c` does the same few-row products for int8 / int4 weights (gptlab/models/quant.py, `quant_linear`);
`attention.c` reads decode attention in place from the paged KV cache (fp32 or bf16), split over spans of
keys for long contexts.

Each C source has an AVX2 and an AVX-512 path (simd.h), and gemv.c a third for AVX512_BF16's native bf16
dot products; build.py compiles each for the best instruction set this CPU's flags allow (`isa()`; capped by
`GPTLAB_ISA=avx2|avx512`) with the system C compiler, once, into the user cache. `GPTLAB_KERNELS=0` turns all
of this off (plain F.linear and SDPA everywhere). `status()` says what is in use and why; `gptlab info`
prints it. bench/bench_inference.py measures the effect against transformers.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from gptlab.kernels import build
from gptlab.kernels.build import enabled, isa

MAX_ROWS = 8  # rows gemv.c takes where torch's GEMMs have AVX-512 (or bf16 units): past that they win
AVX2_MAX_ROWS = 32  # on AVX2-only CPUs gemv.c's 4 x 3 tiles keep up with oneDNN to ~32 rows (GPT-2, Qwen3 shapes)
ONEDNN_MAX_ROWS = 128  # measured crossover with the default path for 768..3072-wide layers
LARGE_OUT = 8192  # vocabulary-sized heads: oneDNN is faster at every row count measured (up to 1024)

__all__ = ["cpu_linear", "quant_linear", "paged_decode", "status", "summary", "enabled", "isa", "library"]

_why_not = build.why_not


def _signatures(name: str, cdll: ctypes.CDLL) -> None:
    if name == "gemv":
        for fn in (cdll.gptlab_linear_f32, cdll.gptlab_linear_bf16):
            fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3
            fn.restype = None
        cdll.gptlab_isa.restype = ctypes.c_char_p
    elif name == "quant":
        for fn in (cdll.gptlab_linear_q8, cdll.gptlab_linear_q4):
            fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3
            fn.restype = None
        cdll.gptlab_quant_rounds_activations.restype = ctypes.c_int
    elif name == "attention":
        for fn in (cdll.gptlab_paged_decode_f32, cdll.gptlab_paged_decode_bf16):
            fn.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 6 + [ctypes.c_float]
            fn.restype = None
        fn = cdll.gptlab_paged_store_decode
        fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 7 + [ctypes.c_void_p] * 3 + [ctypes.c_int64] + \
            [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 6 + [ctypes.c_float]
        fn.restype = None


@functools.cache
def library(name: str, level: str | None = None) -> ctypes.CDLL | None:
    """Kernel NAME ("gemv", "quant", "attention") built for `level` (default: the best this CPU runs), or None."""
    cdll = build.build(name, level)
    if cdll is not None:
        _signatures(name, cdll)
    return cdll


@functools.cache
def _gemv() -> ctypes.CDLL | None:
    return library("gemv")


@functools.cache
def _quant() -> ctypes.CDLL | None:
    return library("quant")


@functools.cache
def _attention() -> ctypes.CDLL | None:
    return library("attention")


def rounds_activations(lib: ctypes.CDLL | None = None) -> bool:
    """Whether quant.c's int8 and int4 products round the activations to int8 too (its AVX512-VNNI build)."""
    lib = lib or _quant()
    return bool(lib is not None and lib.gptlab_quant_rounds_activations())


QUANT_MAX_ROWS = 16  # rows quant.c takes (each reads the weights once more); past that, dequantize + GEMM wins


def quant_linear(x: torch.Tensor, kind: str, q: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor | None:
    """x @ dequant(q, scales).T + bias by quant.c (int8 / int4 weights), or None where it does not run here.
    Decode calls this for every layer of every token, so fp32 (the usual case) takes no conversions."""
    K = x.shape[-1]
    rows = x.numel() // K if K else 0
    if not 0 < rows <= QUANT_MAX_ROWS or x.device.type != "cpu" or (lib := _quant()) is None:
        return None
    fp32 = x.dtype is torch.float32
    xf = x.contiguous() if fp32 else x.float().contiguous()
    if bias is not None and bias.dtype is not torch.float32:
        bias = bias.float()
    N = q.shape[0]
    y = xf.new_empty(x.shape[:-1] + (N,))
    fn = lib.gptlab_linear_q8 if kind == "int8" else lib.gptlab_linear_q4
    fn(xf.data_ptr(), q.data_ptr(), scales.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(),
       rows, N, K)
    return y if fp32 else y.to(x.dtype)


def paged_decode(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor,
                 first: torch.Tensor, last: torch.Tensor, scale: float) -> torch.Tensor | None:
    """Decode attention read in place from a paged KV pool (attention.c), or None where it cannot run here
    (the caller gathers and uses SDPA). q (R, nh, hs); k_pool (blocks, nkv, ceil(hs / 2), bs, 2): each block's
    keys in pairs of dimensions (a zero after an odd hs); v_pool (blocks, bs, nkv, hs); both fp32 or both bf16,
    contiguous; tables (R, width) int64; row r attends to positions first[r] .. last[r] - 1 (int64). Returns
    (R, nh, hs) in q's dtype (computed in fp32)."""
    dtype = k_pool.dtype
    if (dtype is not torch.float32 and dtype is not torch.bfloat16) or v_pool.dtype is not dtype \
            or q.device.type != "cpu" or (lib := _attention()) is None:
        return None
    if tables.dtype is not torch.int64 or first.dtype is not torch.int64 or last.dtype is not torch.int64:
        raise ValueError("paged_decode takes int64 tables, first and last")
    R, nh, hs = q.shape
    _, bs, nkv, _ = v_pool.shape
    qf = q.float().contiguous()
    out = torch.empty_like(qf)
    fn = lib.gptlab_paged_decode_bf16 if dtype is torch.bfloat16 else lib.gptlab_paged_decode_f32
    fn(qf.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), tables.data_ptr(), first.data_ptr(), last.data_ptr(),
       out.data_ptr(), R, nh, nkv, hs, bs, tables.shape[1], scale)
    return out.to(q.dtype)


def paged_store_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, k_pool: torch.Tensor,
                       v_pool: torch.Tensor, tables: torch.Tensor, first: torch.Tensor, last: torch.Tensor,
                       scale: float) -> torch.Tensor | None:
    """A decode-only step's attention in one call: the new keys and values (one token per row) into their slots
    of the pools, then paged_decode. q (1, nh, R, hs), k and v (1, nkv, R, hs), each with unit stride along hs
    (views of the qkv product are fine), all fp32 or all bf16; slots (R,) int64; the rest as paged_decode.
    Returns (R, nh, hs) in q's dtype, or None where it cannot run here (the caller stores and calls apart)."""
    dtype, pool = q.dtype, k_pool.dtype
    if (dtype is not torch.float32 and dtype is not torch.bfloat16) or k.dtype is not dtype or v.dtype is not dtype \
            or (pool is not torch.float32 and pool is not torch.bfloat16) or v_pool.dtype is not pool \
            or q.device.type != "cpu" or q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1 \
            or q.shape[0] != 1 or (lib := _attention()) is None:
        return None
    if slots.dtype is not torch.int64 or tables.dtype is not torch.int64 or first.dtype is not torch.int64 \
            or last.dtype is not torch.int64:
        raise ValueError("paged_store_decode takes int64 slots, tables, first and last")
    _, nh, R, hs = q.shape
    _, bs, nkv, _ = v_pool.shape
    out = q.new_empty((R, nh, hs))
    lib.gptlab_paged_store_decode(q.data_ptr(), k.data_ptr(), v.data_ptr(), q.stride(2), q.stride(1), k.stride(2),
                                  k.stride(1), v.stride(2), v.stride(1), dtype is torch.bfloat16, slots.data_ptr(),
                                  k_pool.data_ptr(), v_pool.data_ptr(), pool is torch.bfloat16, tables.data_ptr(),
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
    flags = build.cpu_flags()
    if flags:
        return bool({"avx512_bf16", "amx_bf16"} & flags)
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(p is None for p in probes):
        return True  # cannot tell: leave bf16 GEMMs to torch
    return any(p() for p in probes)


def _gemv_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lib: ctypes.CDLL) -> torch.Tensor:
    """gemv.c: x, weight, bias and the result all fp32 or all bf16 (no conversions around the call)."""
    N, K = weight.shape
    x = x.contiguous()
    y = x.new_empty(x.shape[:-1] + (N,))
    fn = lib.gptlab_linear_bf16 if weight.dtype is torch.bfloat16 else lib.gptlab_linear_f32
    fn(x.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(), x.numel() // K, N, K)
    return y


def cpu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """x @ weight.T + bias by the fastest kernel here for this shape, or None (use F.linear).

    Call only without autograd (nothing here records a graph). Results agree with F.linear to float
    rounding (summation order differs). Decode calls this for every layer of every token, so it is kept lean.
    """
    dtype = weight.dtype
    if x.dtype is not dtype or x.device.type != "cpu" or weight.dim() != 2 or \
            (bias is not None and bias.dtype is not dtype):
        return None
    K = x.shape[-1]
    rows = x.numel() // K if K else 0
    if dtype is torch.float32:
        ours = rows <= _max_rows()
    else:
        ours = dtype is torch.bfloat16 and (rows <= MAX_ROWS or not _native_bf16())
    if ours and rows and weight.is_contiguous() and (lib := _gemv()) is not None:
        return _gemv_linear(x, weight, bias, lib)
    if dtype is torch.float32 and (rows <= ONEDNN_MAX_ROWS or weight.shape[0] >= LARGE_OUT) and _onednn():
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return None


def status() -> dict[str, str]:
    """{kernel: "in use (instruction set; what it takes)" or the reason it is not}, building what is not yet built."""
    level = isa()
    if _gemv():
        native = " by native bf16 dot products" if level == "avx512_bf16" else ""
        bf16 = f"up to {MAX_ROWS} rows{native}" if _native_bf16() else \
            "at any row count: this CPU has no bf16 arithmetic"
        gemv = f"in use ({level}; fp32 up to {_max_rows()} rows, bf16 {bf16})"
    else:
        gemv = _why_not["gemv"]
    return {
        "attention": f"in use ({level}; fp32 / bf16 paged decode)" if _attention() else _why_not["attention"],
        "gemv": gemv,
        "onednn": f"in use (fp32, up to {ONEDNN_MAX_ROWS} rows and vocabulary heads)" if _onednn()
        else _why_not["onednn"],
        "quant": (f"in use ({level}; int8 / int4 weights, up to {QUANT_MAX_ROWS} rows"
                  + ("; by VNNI dot products, activations rounded to int8)" if rounds_activations() else ")"))
        if _quant() else _why_not["quant"],
    }


def summary() -> str:
    """`status()` on one line, as `gptlab info` and the benchmarks print it."""
    return "; ".join(f"{k}: {v}" for k, v in status().items())

