"""The CPU inference kernels (gptlab/kernels) give F.linear's result, and step aside when they cannot."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from gptlab import kernels
from gptlab.models.model import linear

needs_gemv = pytest.mark.skipif(kernels._gemv() is None, reason=f"gemv kernel not here: {kernels.status()['gemv']}")


def _close(y: torch.Tensor, ref: torch.Tensor) -> None:
    # a different summation order: equal to a few ulps of the largest partial sums
    scale = ref.abs().max().clamp(min=1.0)
    assert (y - ref).abs().max() <= 1e-5 * scale


@needs_gemv
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 37])  # 37: several 16-row chunks and a ragged one
@pytest.mark.parametrize("n_out,k", [(1, 1), (5, 7), (13, 33), (64, 768), (1029, 96), (96, 3072)])
@pytest.mark.parametrize("bias", [True, False])
def test_gemv_equals_f_linear(rows, n_out, k, bias):
    g = torch.Generator().manual_seed(rows * 1000 + n_out + k)
    x = torch.randn(rows, k, generator=g)
    w = torch.randn(n_out, k, generator=g)
    b = torch.randn(n_out, generator=g) if bias else None
    y = kernels._gemv_linear(x, w, b, kernels._gemv())
    assert y.shape == (rows, n_out) and y.dtype == torch.float32
    _close(y, F.linear(x, w, b))


@needs_gemv
@pytest.mark.parametrize("rows", [1, 5, 40])
@pytest.mark.parametrize("n_out,k", [(7, 9), (1029, 96), (64, 768)])
def test_gemv_bf16_is_the_fp32_sum_rounded_once(rows, n_out, k):
    g = torch.Generator().manual_seed(rows + n_out + k)
    x, w, b = (torch.randn(*s, generator=g).bfloat16() for s in ((rows, k), (n_out, k), (n_out,)))
    y = kernels._gemv_linear(x, w, b, kernels._gemv())
    assert y.dtype == torch.bfloat16
    exact = F.linear(x.float(), w.float(), b.float())  # the bf16 inputs are exact in fp32
    # one rounding to bf16 (8 significant bits) of a sum that differs from `exact` only in float rounding
    assert ((y.float() - exact).abs() <= exact.abs() * 2**-8 + 1e-4 * exact.abs().max()).all()


@needs_gemv
def test_gemv_keeps_leading_dims_and_reads_strided_inputs():
    x = torch.randn(4, 10, 48)[:, -1:]  # (4, 1, 48), not contiguous: the last position of each row
    w, b = torch.randn(20, 48), torch.randn(20)
    with torch.no_grad():
        y = linear(x, w, b)
    assert y.shape == (4, 1, 20)
    _close(y, F.linear(x, w, b))


@needs_gemv
def test_gemv_result_does_not_depend_on_thread_count():
    x, w = torch.randn(2, 300), torch.randn(999, 300)
    lib = kernels._gemv()
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels._gemv_linear(x, w, None, lib)
        torch.set_num_threads(2)
        two = kernels._gemv_linear(x, w, None, lib)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, two)


def test_kernel_choice_by_shape_dtype_and_layout():
    w = torch.randn(64, 32)
    many = kernels.cpu_linear(torch.randn(64, 32).bfloat16(), w.bfloat16())  # bf16 past MAX_ROWS: ours only where
    assert (many is None) == (kernels._gemv() is None or kernels._native_bf16())  # torch would emulate bf16
    assert kernels.cpu_linear(torch.randn(2, 32).double(), w.double()) is None  # only fp32 is ours
    assert kernels.cpu_linear(torch.randn(4096, 32), w) is None  # a big GEMM: the default path


@needs_gemv
def test_transposed_weights_never_reach_the_gemv_kernel(monkeypatch):
    """gemv.c reads weight rows as contiguous memory: a transposed view must go elsewhere, and give F.linear's
    result; a contiguous weight of the same shape must take gemv.c (so the check is not vacuous)."""
    calls = []
    real = kernels._gemv_linear
    monkeypatch.setattr(kernels, "_gemv_linear", lambda x, w, b, lib: calls.append(w.is_contiguous()) or real(x, w, b, lib))
    x, w = torch.randn(1, 32), torch.randn(64, 32)
    transposed = w.t().contiguous().t()  # same values, column-major memory
    y = kernels.cpu_linear(x, transposed)
    assert calls == []
    if y is not None:
        _close(y, F.linear(x, w))
    kernels.cpu_linear(x, w)
    assert calls == [True]


def test_autograd_uses_f_linear():
    x = torch.randn(1, 16, requires_grad=True)
    w = torch.randn(8, 16, requires_grad=True)
    linear(x, w).sum().backward()  # grad enabled: F.linear, which records the graph
    assert torch.allclose(x.grad, w.sum(0).detach()[None], atol=1e-5)
    assert torch.allclose(w.grad, x.detach().expand(8, 16), atol=1e-5)


def _status_in_subprocess(env: dict[str, str]) -> tuple[dict[str, str], bool]:
    """(kernels.status(), whether a linear layer still computes) in a fresh process with `env`."""
    code = "import json, torch; from gptlab import kernels; print(json.dumps(kernels.status())); " \
           "print(bool((torch.nn.functional.linear(torch.ones(1, 3), torch.ones(2, 3)) == 3).all()))"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                         timeout=120, check=True)
    status, works = out.stdout.splitlines()
    return json.loads(status), works == "True"


def test_disabled_by_environment():
    status, works = _status_in_subprocess({"GPTLAB_KERNELS": "0"})
    assert status == {"attention": "GPTLAB_KERNELS=0", "gemv": "GPTLAB_KERNELS=0", "onednn": "GPTLAB_KERNELS=0",
                      "quant": "GPTLAB_KERNELS=0"}
    assert works


@needs_gemv  # where gemv.c can be built at all, a missing compiler is the only reason it is not
def test_no_compiler_means_fallback_not_failure(tmp_path):
    status, works = _status_in_subprocess({"GPTLAB_CACHE": str(tmp_path), "CC": str(tmp_path / "no-such-cc")})
    assert status["gemv"].startswith("could not compile gemv.c with"), status
    assert works  # and linear layers still compute, by the next kernel in line
    assert not list(tmp_path.rglob("*.so*"))  # no library left behind, half-built or whole


@needs_gemv
def test_decode_with_kernels_matches_plain_f_linear(tiny_gpt2_dir):
    """The whole generate path, kernels on vs GPTLAB_KERNELS=0, on a GPT-2 whose Conv1D weights were transposed."""
    import gptlab
    from gptlab.infer.generate import generate_ids

    model = gptlab.load(tiny_gpt2_dir)
    assert all(p.is_contiguous() for p in model.parameters())  # load lays every weight out row-major
    prompt = [[1, 2, 3, 4, 5]]
    with torch.no_grad():
        fast = model(torch.tensor(prompt))
    ids = generate_ids(model, prompt, max_new_tokens=12, eos_id=[])
    code = ("import gptlab, torch; from gptlab.infer.generate import generate_ids; "
            f"m = gptlab.load({str(tiny_gpt2_dir)!r}); print(generate_ids(m, {prompt}, max_new_tokens=12, eos_id=[]))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "GPTLAB_KERNELS": "0"},
                         capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == str(ids)
    with torch.enable_grad():
        slow = model(torch.tensor(prompt))
    _close(fast, slow.detach())


needs_attention = pytest.mark.skipif(kernels._attention() is None,
                                     reason=f"attention kernel not here: {kernels.status()['attention']}")


@needs_attention
@pytest.mark.parametrize("nh,nkv,hs,bs", [(4, 4, 16, 4), (8, 2, 64, 16), (6, 3, 20, 5), (2, 1, 128, 16)])
@pytest.mark.parametrize("window", [0, 7])
def test_paged_decode_equals_gathered_sdpa(nh, nkv, hs, bs, window):
    g = torch.Generator().manual_seed(nh * 100 + hs + bs + window)
    blocks = 24
    kp, vp = (torch.randn(blocks, bs, nkv, hs, generator=g) for _ in range(2))
    lengths = [1, 5, bs * 3 + 1, 17]
    tables = torch.stack([torch.randperm(blocks, generator=g)[:6] for _ in lengths])  # scattered blocks
    pos = torch.tensor(lengths) - 1
    first = (pos - window + 1).clamp(min=0) if window else torch.zeros_like(pos)
    q = torch.randn(len(lengths), nh, hs, generator=g)
    scale = hs ** -0.5
    got = kernels.paged_decode(q, kp, vp, tables, first, pos + 1, scale)
    for r, n in enumerate(lengths):
        slots = [int(tables[r, j // bs]) * bs + j % bs for j in range(int(first[r]), n)]
        k = kp.reshape(-1, nkv, hs)[slots].transpose(0, 1)  # (nkv, L, hs)
        v = vp.reshape(-1, nkv, hs)[slots].transpose(0, 1)
        ref = F.scaled_dot_product_attention(q[r][:, None], k, v, scale=scale, enable_gqa=nh != nkv)[:, 0]
        _close(got[r], ref)


@needs_attention
def test_paged_decode_does_not_depend_on_thread_count_and_refuses_what_it_cannot_do():
    kp, vp = torch.randn(8, 4, 2, 32), torch.randn(8, 4, 2, 32)
    args = (torch.randn(3, 4, 32), kp, vp, torch.tensor([[0, 1], [2, 3], [4, 5]]), torch.zeros(3, dtype=torch.long),
            torch.tensor([3, 8, 6]), 0.2)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.paged_decode(*args)
        torch.set_num_threads(2)
        two = kernels.paged_decode(*args)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, two)
    assert kernels.paged_decode(args[0].bfloat16(), kp.bfloat16(), vp.bfloat16(), *args[3:]) is None  # fp32 only
