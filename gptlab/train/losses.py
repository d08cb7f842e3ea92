"""Loss functions for the training loop's `loss_fn` hook: (model, batch) -> (summed loss, items counted).

Each returns a SUM and a COUNT; the Trainer divides by the count summed over gradient-accumulation
micro-batches and over processes, so every counted item weighs the same however the batch is split.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab.data.examples import IGNORE_INDEX
from gptlab.train.runtime import unwrap


def next_token_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over labels != -100, and how many labels that is.

    The head and the loss are fused and chunked (`linear_cross_entropy`), so the (B, T, V) logits are never
    materialised in fp32: on CPU that saves several full passes over the largest tensor of the step.
    """
    hidden = model(batch["input_ids"], return_hidden=True)  # (B, T, C)
    head = unwrap(model).lm_head
    labels = batch["labels"]
    loss = linear_cross_entropy(hidden.flatten(0, 1), head.weight, head.bias, labels.flatten())
    return loss, (labels != IGNORE_INDEX).sum()


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i W^T + b, y_i), with gradients computed chunk by chunk during the forward pass.

    Each chunk's logits are made, turned into (softmax - one-hot) in place and multiplied back at once,
    so the peak extra memory is one chunk of logits and the softmax is evaluated once (Liger-Kernel's
    fused linear cross-entropy, Hsu et al. 2024, on plain PyTorch ops).
    """

    @staticmethod
    def forward(ctx, h, weight, bias, labels, chunk, dtype):
        N = h.shape[0]
        hc, wc = h.to(dtype), weight.to(dtype)
        bc = bias.to(dtype) if bias is not None else None
        grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device)
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=h.device) if bias is not None else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            logits = (hc[s:e] @ wc.t() if bc is None else torch.addmm(bc, hc[s:e], wc.t())).float()  # (n, V)
            y = labels[s:e]
            keep = (y != IGNORE_INDEX).unsqueeze(1).float()  # (n, 1)
            y = y.clamp(min=0).unsqueeze(1)
            target = logits.gather(1, y)  # (n, 1)
            # softmax in place, one exp pass over the chunk (logsumexp would make its own shifted copy)
            peak = logits.amax(dim=-1, keepdim=True)
            g = logits.sub_(peak).exp_()  # unnormalised probabilities
            norm = g.sum(dim=-1, keepdim=True)
            total += ((peak + norm.log() - target) * keep).sum()
            g.mul_(keep / norm)  # d(sum CE)/d(logits) = softmax - one_hot, zero on ignored rows
            g.scatter_add_(1, y, -keep)
            g = g.to(dtype)
            if dtype == torch.float32:
                torch.mm(g, wc, out=grad_h[s:e])
                grad_w.addmm_(g.t(), hc[s:e])
            else:
                grad_h[s:e] = g @ wc
                grad_w += (g.t() @ hc[s:e]).float()
            if grad_b is not None:
                grad_b += g.float().sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b if grad_b is not None else torch.empty(0))
        ctx.has_bias = bias is not None
        ctx.dtypes = (h.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        hd, wd = ctx.dtypes
        gb = (grad_b * grad_out).to(wd) if ctx.has_bias else None
        return (grad_h * grad_out).to(hd), (grad_w * grad_out).to(wd), gb, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                         chunk: int = 1024) -> torch.Tensor:
    """Summed CE of logits h @ weight.T + bias (h (N, C), weight (V, C), labels (N,), -100 ignored).

    Under autocast the matmuls run in the autocast dtype; the softmax is always fp32.
    """
    dev = h.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
    needs_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    with torch.autocast(dev, enabled=False):
        if needs_grad:
            return _LinearCrossEntropy.apply(h, weight, bias, labels, chunk, dtype)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        hc, wc = h.to(dtype), weight.to(dtype)
        for s in range(0, h.shape[0], chunk):
            logits = (hc[s:s + chunk] @ wc.t()).float()
            if bias is not None:
                logits += bias.float()
            total += F.cross_entropy(logits, labels[s:s + chunk], ignore_index=IGNORE_INDEX,
                                                       reduction="sum")
        return total


def classification_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of the class logits (a SequenceClassifier), and the number of rows."""
    logits = model(batch["input_ids"])  # (B, K)
    return F.cross_entropy(logits.float(), batch["labels"], reduction="sum"), batch["labels"].numel()


def gpt1_task_loss(lm_weight: float):
    """GPT-1's fine-tuning objective L3 = L2 + lm_weight * L1 (Radford et al. 2018, eq. 5): the task's
    cross-entropy (a TaskClassifier's logits) plus the language-modelling loss on the task's own sequences.
    Summed per row, so the Trainer's division by rows gives mean task CE + lm_weight x mean LM CE per token."""

    def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        logits, hidden = model(batch["input_ids"], with_hidden=True)
        rows = batch["labels"].numel()
        total = F.cross_entropy(logits.float(), batch["labels"], reduction="sum")
        if lm_weight:
            head = unwrap(model).model.lm_head
            lm_labels = batch["lm_labels"].flatten()
            lm = linear_cross_entropy(hidden.flatten(0, 1), head.weight, head.bias, lm_labels)
            total = total + lm_weight * lm * rows / (lm_labels != IGNORE_INDEX).sum().clamp(min=1)
        return total, rows

    return loss
