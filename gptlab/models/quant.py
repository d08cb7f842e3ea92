"""Weight-only quantization for inference: int8 (one scale per output channel) and int4 (one scale per group of
32 weights), symmetric, round-to-nearest.

    model = gptlab.load("out/python-docs/final", quantize="int8")     # or quantize(model, "int4")

Every Linear of the blocks and the head becomes a QuantLinear: its weight is stored as integers and scales
(int8: a quarter of fp32's bytes, int4: an eighth plus the scales), and decode reads only those (a head tied
to the embedding gets its own integer copy; the embedding keeps its dtype for lookups). On
x86 CPUs with AVX2 the few-row products (batch-1 decode, an engine's decode tokens) run in kernels/quant.c,
which widens the integers in registers; everything else (prefill, GPUs) multiplies by the dequantized weight,
built per call. Embeddings (a lookup, not a product), norms and MoE experts stay as they were. Activations stay in
the model's dtype; only the weights are rounded:

    int8   scale[n] = max_k |w[n, k]| / 127,    q = round(w / scale) in [-127, 127]
    int4   scale[n, g] = max |w[n, g-th 32]| / 7, q = round(w / scale) in [-8, 7], stored as q + 8 in a nibble

A quantized model stays in eval mode (`train()` is refused). `gptlab.save` writes it as an int8 / int4 model dir
(gptlab/formats/quantized.py: `gptlab export MODEL --format int8`) that `gptlab.load` reopens as it was.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab import kernels
from gptlab.errors import GptlabError

Scheme = Literal["int8", "int4"]
SCHEMES = ("int8", "int4")
GROUP = 32  # int4 group size (kernels/quant.c assumes it)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (N, K), scale fp32 (N,)) with w ~ scale[:, None] * q."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def quantize_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 (N, K/2), scale fp32 (N, K/32)); K must be a multiple of 32 (see the layout in quant.c)."""
    n, k = w.shape
    if k % GROUP:
        raise GptlabError(f"int4 needs an input width that is a multiple of {GROUP}, got {k}")
    g = w.float().view(n, k // GROUP, GROUP)
    scale = g.abs().amax(dim=2).clamp(min=1e-12) / 7.0
    q = (torch.round(g / scale[..., None]).clamp(-8, 7) + 8).to(torch.uint8)  # 0..15
    packed = q[..., :GROUP // 2] | (q[..., GROUP // 2:] << 4)  # byte j: weight j (low), weight j + 16 (high)
    return packed.reshape(n, k // 2).contiguous(), scale.contiguous()


def dequantize(kind: str, q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """The weight (N, K) that the integers and scales stand for."""
    if kind == "int8":
        return (q.float() * scale[:, None]).to(dtype)
    n = q.shape[0]
    b = q.view(n, -1, GROUP // 2)
    vals = torch.cat([b & 0x0F, b >> 4], dim=2).float() - 8.0  # (N, groups, 32)
    return (vals * scale[..., None]).reshape(n, -1).to(dtype)


class QuantLinear(nn.Module):
    """A Linear with int8 or int4 weights (buffers qweight, scales) and the original bias."""

    def __init__(self, linear: nn.Linear, kind: str) -> None:
        super().__init__()
        self.kind, self.in_features, self.out_features = kind, linear.in_features, linear.out_features
        q, s = (quantize_int8 if kind == "int8" else quantize_int4)(linear.weight.detach())
        self.register_buffer("qweight", q.to(linear.weight.device))
        self.register_buffer("scales", s.to(linear.weight.device))
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (built on each access; for code that reads .weight, such as the tied head)."""
        return dequantize(self.kind, self.qweight, self.scales, self.scales.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            y = kernels.quant_linear(x, self.kind, self.qweight, self.scales, self.bias)
            if y is not None:
                return y
        w = dequantize(self.kind, self.qweight, self.scales, x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def train(self, mode: bool = True) -> "QuantLinear":
        """Only eval mode: integer weights have no gradient, and a trainer would silently train the rest alone."""
        if mode:
            raise GptlabError(f"this model holds {self.kind} weights, which are for inference: it cannot be trained "
                              f"or fine-tuned; train the original (unquantized) model, then quantize or export it")
        return super().train(False)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.kind}, bias={self.bias is not None}"


def quantize(model: nn.Module, kind: str) -> nn.Module:
    """Replace the model's Linear layers (blocks and head) by QuantLinear in place; returns the model. A head tied
    to the embedding gets its own integer copy (the embedding stays as it is for lookups). int4 layers whose
    input width is not a multiple of 32 are quantized to int8 instead."""
    if kind not in SCHEMES:
        raise GptlabError(f"quantize must be one of {', '.join(SCHEMES)}, got {kind!r}")
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise GptlabError("this model is already quantized")
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            if child_name in ("router", "shared_gate"):  # MoE routing: tiny, and rounding it would change routes
                continue
            layer_kind = kind if kind == "int8" or child.in_features % GROUP == 0 else "int8"
            setattr(module, child_name, QuantLinear(child, layer_kind))
    model.quantization = kind
    return model.eval().requires_grad_(False)

