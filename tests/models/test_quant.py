"""Weight-only int8 / int4: the rounding's error bounds, the dispatch that picks quant.c, and whole models (logits,
generation, perplexity of a trained model, the CLI flag). quant.c itself is tested in tests/test_kernels.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gptlab import kernels
from gptlab.errors import GptlabError
from gptlab.models.config import Config
from gptlab.models.model import GPT
from gptlab.models.quant import GROUP, QuantLinear, dequantize, quantize, quantize_int4, quantize_int8

needs_kernel = pytest.mark.skipif(kernels._quant() is None, reason="quant.c needs Linux x86-64 with AVX2 and a C "
                                  "compiler")


def test_rounding_error_is_at_most_half_a_step():
    w = torch.randn(37, 96, generator=torch.Generator().manual_seed(0)) * 0.05
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert ((dequantize("int8", q, s) - w).abs() <= s[:, None] / 2 + 1e-7).all()
    p, g = quantize_int4(w)
    assert p.dtype == torch.uint8 and p.shape == (37, 48) and g.shape == (37, 96 // GROUP)
    step = g.repeat_interleave(GROUP, dim=1)
    assert ((dequantize("int4", p, g) - w).abs() <= step / 2 + 1e-7).all()
    with pytest.raises(GptlabError, match="multiple of 32"):
        quantize_int4(torch.randn(4, 40))


# quant.c against F.linear on the dequantized weights, on every instruction set this CPU runs, over odd shapes,
# row and thread counts (and against the exact activation rounding of its VNNI int8 path): tests/test_kernels.py


@needs_kernel
def test_dispatch_uses_the_kernel_for_few_rows_only(monkeypatch):
    layer = QuantLinear(torch.nn.Linear(64, 10), "int8")
    calls = []
    real = kernels.quant_linear

    def spy(x, *a):
        y = real(x, *a)
        calls.append(y is not None)
        return y

    monkeypatch.setattr(kernels, "quant_linear", spy)
    with torch.no_grad():
        layer(torch.randn(1, 64))  # batch-1 decode: quant.c
        layer(torch.randn(kernels.QUANT_MAX_ROWS + 1, 64))  # a prefill: dequantize + GEMM
    assert calls == [True, False]
    assert "quant" in kernels.status() and kernels.status()["quant"].startswith("in use")
    monkeypatch.setattr(kernels, "_quant", lambda: None)  # no kernel here: still correct, through F.linear
    with torch.no_grad():
        torch.testing.assert_close(layer(torch.ones(1, 64)), F.linear(torch.ones(1, 64), layer.weight, layer.bias))


def _model(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(Config(n_layer=2, n_head=2, n_embd=64, context_length=32, vocab_size=97, **kw)).eval()


@pytest.mark.parametrize("kind,tol", [("int8", 0.02), ("int4", 0.2)])
def test_quantized_model_stays_close_and_generates(kind, tol):
    model = _model(tie_embeddings=False)
    x = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
        quantize(model, kind)
        out = model(x)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 2 * 4 + 1  # qkv, proj, fc, proj per block, and the untied head
    assert (out - ref).abs().max() / ref.abs().max() < tol
    from gptlab.infer.generate import generate_ids

    ids = generate_ids(model, [[1, 2, 3]], max_new_tokens=5, temperature=0)
    assert len(ids[0]) == 5
    with pytest.raises(GptlabError, match="already quantized"):
        quantize(model, kind)
    with pytest.raises(GptlabError, match="int8, int4"):
        quantize(_model(), "int3")


def test_a_tied_head_gets_its_own_integers_and_the_embedding_stays():
    model = _model()
    wte = model.wte.weight.detach().clone()
    quantize(model, "int4")
    assert isinstance(model.lm_head, QuantLinear) and torch.equal(model.wte.weight, wte)
    torch.testing.assert_close(model.lm_head.weight, wte, atol=float(wte.abs().max()) / 7, rtol=0)


def test_a_quantized_model_cannot_be_put_back_into_training():
    model = quantize(_model(), "int8")
    with pytest.raises(GptlabError, match="cannot be trained or fine-tuned"):
        model.train()
    assert not model.eval().training  # eval mode stays available (and is where it already is)
