"""The optimizer and the learning-rate schedule of the training loop (its config: loop.LoopConfig)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn as nn

from gptlab.errors import GptlabError


def make_optimizer(params: Iterable[nn.Parameter], cfg, device: torch.device,  # cfg: LoopConfig
                   model: nn.Module | None = None) -> torch.optim.Optimizer:
    """AdamW with weight decay on 2-D (and larger) weights only, fused when the device supports it; or, with
    cfg.optimizer == "muon", Muon for the model's hidden matrices and AdamW for the rest (see Muon)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise GptlabError("no parameters to train (all have requires_grad=False)")
    seen: set[int] = set()
    unique = [p for p in params if not (id(p) in seen or seen.add(id(p)))]  # tied weights appear once
    if getattr(cfg, "optimizer", "adamw") == "muon":
        return _muon_for(unique, cfg, model)
    groups = [
        {"params": [p for p in unique if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in unique if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    try:
        # (sharded DTensor parameters, --fsdp, take the foreach path)
        fused = device.type in ("cuda", "cpu", "mps") and not getattr(cfg, "fsdp", False)
        return torch.optim.AdamW(groups, fused=fused, **kw)
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


# ---- Muon ----
def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """An approximation of U V^T for g = U S V^T by the quintic Newton-Schulz iteration of Jordan et al. (2024,
    "Muon"): coefficients (3.4445, -4.7750, 2.0315) push every singular value towards ~1 in five steps."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.float()  # (..., rows, cols): leading dims are a batch of same-shaped matrices
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT  # iterate on the wide side: x @ x.T is the smaller Gram matrix
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for 2-D hidden weights (momentum, Nesterov, then the update orthogonalised by `orthogonalize`, scaled
    by sqrt(max(1, rows / cols))), AdamW for the groups marked adamw (embeddings, the head, gains and biases).

    Every group's "lr" is set by the trainer's schedule times the group's "lr_scale", so Muon's own learning rate
    (LoopConfig.muon_lr) follows the same warm-up and decay. Weight decay is decoupled in both kinds of group.
    """

    def __init__(self, groups: list[dict], betas=(0.9, 0.95), eps: float = 1e-8, momentum: float = 0.95):
        super().__init__(groups, dict(lr=1e-3, lr_scale=1.0, weight_decay=0.0, muon=False, betas=betas, eps=eps,
                                      momentum=momentum))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            if group["muon"]:
                self._muon_step(group)
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if wd:
                    p.mul_(1 - lr * wd)
                if not state:
                    state.update(step=torch.zeros(()), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                b1, b2 = group["betas"]
                state["step"] += 1
                t = float(state["step"])
                state["exp_avg"].lerp_(p.grad, 1 - b1)
                state["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                denom = (state["exp_avg_sq"] / (1 - b2 ** t)).sqrt_().add_(group["eps"])
                p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - b1 ** t))

    def _muon_step(self, group: dict) -> None:
        """Momentum, Nesterov, orthogonalise: matrices of one shape in one batched Newton-Schulz call (every
        layer's qkv together, ...), which on a CPU costs little more than one matrix."""
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        by_shape: dict[tuple[int, ...], list[nn.Parameter]] = {}
        for p in group["params"]:
            if p.grad is not None:
                by_shape.setdefault(tuple(p.shape), []).append(p)
        for (rows, cols), params in by_shape.items():
            updates = []
            for p in params:
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - mu)
                updates.append(p.grad.lerp(buf, mu))  # Nesterov
            ortho = orthogonalize(torch.stack(updates))
            for p, u in zip(params, ortho):
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(u, alpha=-lr * max(1.0, rows / cols) ** 0.5)


def _muon_for(params: list[nn.Parameter], cfg, model: nn.Module | None) -> Muon:
    if model is None:
        raise GptlabError("the muon optimizer needs the model, to tell its hidden matrices from its embeddings")
    outer = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = getattr(model, "lm_head", None)
    if head is not None:
        outer.add(id(head.weight))
    hidden = [p for p in params if p.ndim == 2 and id(p) not in outer]
    if not hidden:
        raise GptlabError("--optimizer muon found no hidden 2-D weights to train; use adamw")
    rest = [p for p in params if p.ndim != 2 or id(p) in outer]
    groups = [{"params": hidden, "muon": True, "lr_scale": cfg.muon_lr / cfg.lr, "weight_decay": cfg.weight_decay}]
    groups += [g for g in ({"params": [p for p in rest if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                           {"params": [p for p in rest if p.ndim < 2]}) if g["params"]]
    return Muon(groups, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
