"""The optimizer and the learning-rate schedule of the training loop (its config: loop.LoopConfig)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn as nn

from gptlab.errors import GptlabError


def make_optimizer(params: Iterable[nn.Parameter], cfg, device: torch.device) -> torch.optim.Optimizer:  # cfg: LoopConfig
    """AdamW with weight decay on 2-D (and larger) weights only, fused when the device supports it."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise GptlabError("no parameters to train (all have requires_grad=False)")
    seen: set[int] = set()
    unique = [p for p in params if not (id(p) in seen or seen.add(id(p)))]  # tied weights appear once
    groups = [
        {"params": [p for p in unique if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in unique if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    try:
        return torch.optim.AdamW(groups, fused=device.type in ("cuda", "cpu", "mps"), **kw)
    except (RuntimeError, TypeError):  # fused kernels missing for this device or dtype
        return torch.optim.AdamW(groups, **kw)


def lr_at(step: int, cfg) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then cosine/linear decay to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    if cfg.schedule == "linear":
        return cfg.lr + (cfg.min_lr - cfg.lr) * progress
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))
