"""One training loop for pretraining and every fine-tuning method: `Trainer`, plus `gptlab train`.

The loop is generic; what differs between methods plugs in:

    from gptlab.train import LoopConfig, Trainer
    trainer = Trainer(
        model,                       # a gptlab GPT (or any nn.Module the hooks understand)
        train_data,                  # BatchSource: .batch(index, rank, world) -> {"input_ids", "labels", ...}
        val_data,                    # BatchSource or None; evaluated every `eval_every` steps
        LoopConfig(max_steps=200, lr=3e-4, out_dir="out/run"),   # or any dataclass that extends LoopConfig
        tokenizer=tok,               # saved with each checkpoint by the default saver
        loss_fn=next_token_loss,     # (model, batch) -> (summed loss, number of items it sums over)
        parameters=None,             # the parameters to train; default: all with requires_grad
        metrics_fn=None,             # (model, val_data, trainer) -> {"name": float}, extra eval metrics
        saver=HFSaver(tok),          # .save(model, dir) / .load(model, dir); default: full HF model dir
        callbacks=[],                # fn(trainer, event, metrics) on "step" / "eval" / "checkpoint"
    )
    result = trainer.fit()           # resumes from out_dir/last when config.resume is set

Conventions the hooks can rely on:
- A batch is a dict of tensors. `labels` are next-token targets already aligned with `input_ids`:
  labels[b, t] is the token that should follow input_ids[b, :t+1]; -100 marks a position left out of the
  loss (a prompt token, padding). For pretraining windows, input_ids = w[:-1] and labels = w[1:].
- `loss_fn` returns a SUM and a COUNT; the trainer divides by the count summed over gradient-accumulation
  micro-batches and over processes, so every counted item weighs the same however the batch is split
  (exactly the loss of one big batch; masked SFT batches of uneven length included).
- Batches are addressed by number: micro-batch `i = step * grad_accum + micro` of rank `rank` in a world
  of `world` processes. A resumed run, or the same global batch split across processes, therefore reads
  exactly the same examples as an uninterrupted single-process run. Validation batches are numbered 0..
- The model the hooks receive may be wrapped (DDP, torch.compile); `unwrap(model)` gives the module.
- Checkpoints are dirs: out_dir/last (for --resume), out_dir/best (best `best_metric`, when keep_best),
  out_dir/final. Each holds what `saver` writes (an HF model dir by default, so `gptlab generate DIR`
  and transformers open it) plus `trainer/` (state.json, optimizer.pt, rng-<rank>.pt). A checkpoint is
  staged in a hidden temporary dir and renamed into place, so a crash never leaves a half-written one.

Distributed: run the same command under `torchrun --nproc_per_node=N`; the process group uses gloo on
CPU and nccl on GPU, and gradients are averaged by DistributedDataParallel.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.nn as nn

from gptlab.cli import command
from gptlab.config import Config
from gptlab.errors import GptlabError

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------------------
# configuration


@dataclass
class LoopConfig:
    """What every training run needs, pretraining or fine-tuning (extend it with a method's own fields)."""

    out_dir: str = "out/run"  # checkpoints (last/, best/, final/), metrics.jsonl and TensorBoard logs go here
    max_steps: int = 1000  # optimizer steps; the learning-rate schedule ends here
    batch_size: int = 8  # sequences per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step (global batch = batch_size * grad_accum * processes)
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # learning rate at the end of the cosine decay
    warmup_steps: int = 100  # linear warm-up from 0 to lr
    schedule: Literal["cosine", "constant", "linear"] = "cosine"  # decay after warm-up
    weight_decay: float = 0.1  # AdamW decay, applied to 2-D weights only (not biases, norms)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = off)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # bf16 = autocast with fp32 weights; auto = bf16 where fast
    compile: bool = False  # torch.compile the model
    device: str = "auto"  # auto, cpu, cuda, cuda:1, mps
    seed: int = 1337  # model init, data order and dropout
    eval_every: int = 100  # evaluate on the validation data every N steps (0 = only at the end)
    eval_batches: int = 20  # validation batches per evaluation (per process)
    log_every: int = 10  # write a metrics.jsonl record every N steps
    save_every: int = 0  # write out_dir/last every N steps (0 = at each evaluation)
    keep_best: bool = True  # keep a copy of the checkpoint with the best best_metric in out_dir/best
    best_metric: str = "val_loss"  # the eval metric that picks best/ and drives early stopping
    maximize: bool = False  # whether a larger best_metric is better (accuracy) or smaller (loss)
    patience: int = 0  # stop after this many evaluations without a new best (0 = never stop early)
    resume: bool = False  # continue from out_dir/last when it exists
    stop_at_step: int = 0  # end this session after this step as if interrupted (resume continues; 0 = off)
    quiet: bool = False  # no progress bar and no log lines
    peak_tflops: float = 0.0  # the device's peak TFLOP/s for MFU (0 = measure a matmul at start-up)


class BatchSource(Protocol):
    """Numbered batches: micro-batch `index` of process `rank` out of `world` (see the module docstring)."""

    def batch(self, index: int, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]: ...

    def __len__(self) -> int: ...  # number of distinct batches for world=1 (validation: one full pass)


class Saver(Protocol):
    def save(self, model: nn.Module, path: Path) -> None: ...

    def load(self, model: nn.Module, path: Path) -> None: ...


LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, "torch.Tensor | int"]]
MetricsFn = Callable[[nn.Module, BatchSource, "Trainer"], dict[str, float]]
Callback = Callable[["Trainer", str, dict[str, Any]], None]


# ---------------------------------------------------------------------------------------------------------
# the default hooks


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model


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
            total += torch.nn.functional.cross_entropy(logits, labels[s:s + chunk], ignore_index=IGNORE_INDEX,
                                                       reduction="sum")
        return total


class HFSaver:
    """The default checkpoint format: a full Hugging Face model dir (config.json + model.safetensors + tokenizer)."""

    def __init__(self, tokenizer=None) -> None:
        self.tokenizer = tokenizer

    def save(self, model: nn.Module, path: Path) -> None:
        unwrap(model).save(path, tokenizer=self.tokenizer)

    def load(self, model: nn.Module, path: Path) -> None:
        from gptlab.hf import load

        module = unwrap(model)
        p = next(module.parameters())
        loaded = load(path, dtype=p.dtype, device=p.device)
        shape = ("model_type", "vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "head_dim",
                 "intermediate_size", "norm", "mlp", "activation", "positions", "tie_embeddings")
        diff = [f"{k}={getattr(loaded.config, k)!r} (run: {getattr(module.config, k)!r})" for k in shape
                if getattr(loaded.config, k) != getattr(module.config, k)]
        if diff:
            raise GptlabError(f"checkpoint {path} does not match this run's model: {', '.join(diff)}")
        with torch.no_grad():
            module.load_state_dict(loaded.state_dict(), strict=True)


# ---------------------------------------------------------------------------------------------------------
# helpers near the model: optimizer, schedule, precision, MFU


def make_optimizer(params: Iterable[nn.Parameter], cfg: LoopConfig, device: torch.device) -> torch.optim.Optimizer:
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


def lr_at(step: int, cfg: LoopConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then cosine/linear decay to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    if cfg.schedule == "linear":
        return cfg.lr + (cfg.min_lr - cfg.lr) * progress
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise GptlabError(f"device {name!r} requested but CUDA is not available")
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return dev


def bf16_is_fast(device: torch.device) -> bool:
    """bf16 autocast pays off on GPUs with bf16 units and CPUs with AVX-512 BF16 / AMX instructions."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
        amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
        return bool((probe and probe()) or (amx and amx()))
    return False


def autocast_dtype(cfg: LoopConfig, device: torch.device) -> torch.dtype | None:
    if cfg.precision == "fp32":
        return None
    if cfg.precision == "bf16" or bf16_is_fast(device):
        return torch.bfloat16
    return None


def flops_per_token(config: Config, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward)."""
    try:
        from gptlab.stats import flops_per_token as stats_flops

        return float(stats_flops(config, seq_len, training=True))
    except ImportError:
        pass
    # 6N for the weights (Kaplan et al. 2020) + 6 L T C for attention scores and values (PaLM, appendix B,
    # counts 12 L T C for full attention; causal attention does half of it)
    L, C = config.n_layer, config.n_embd
    q, kv = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    if config.mlp == "moe":  # only the routed experts' weights are used per token
        mlp = 3 * C * (config.n_expert_per_token * config.moe_intermediate_size + config.shared_expert_intermediate_size)
    else:
        mlp = (3 if config.mlp == "glu" else 2) * C * config.intermediate_size
    n = L * (C * (q + 2 * kv) + q * C + mlp) + C * config.vocab_size  # + the head; embedding lookups are free
    return 6.0 * n + 6.0 * L * seq_len * q


def measure_peak_flops(device: torch.device, dtype: torch.dtype | None) -> float:
    """A quick matmul probe: the MFU reported on machines we have no published peak for is relative to it."""
    dt = dtype or torch.float32
    n = 1024 if device.type == "cpu" else 4096
    gen = torch.Generator(device).manual_seed(0)  # never the global RNG: resuming must not shift dropout masks
    a = torch.randn(n, n, device=device, dtype=dt, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dt, generator=gen)
    best = float("inf")
    for _ in range(8):  # the fastest of several: other processes on a shared machine only slow it down
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------------
# distributed


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t


def init_distributed(device: torch.device) -> Dist:
    """Join the process group torchrun describes (WORLD_SIZE > 1); a plain run is a world of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as tdist

    if not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


# ---------------------------------------------------------------------------------------------------------
# the loop


class Trainer:
    """Train `model` on numbered batches; see the module docstring for the hooks and conventions."""

    def __init__(
        self,
        model: nn.Module,
        train_data: BatchSource,
        val_data: BatchSource | None,
        config: LoopConfig,
        *,
        tokenizer=None,
        loss_fn: LossFn = next_token_loss,
        parameters: Iterable[nn.Parameter] | None = None,
        metrics_fn: MetricsFn | None = None,
        saver: Saver | None = None,
        callbacks: Iterable[Callback] = (),
        bytes_per_token: float | None = None,
        device: torch.device | None = None,
        dist: Dist | None = None,
    ) -> None:
        self.config = cfg = config
        self.device = device or pick_device(cfg.device)
        self.dist = dist or init_distributed(self.device)
        self.model = model.to(self.device)
        self.train_data, self.val_data = train_data, val_data
        self.tokenizer = tokenizer
        self.loss_fn, self.metrics_fn = loss_fn, metrics_fn
        self.saver = saver or HFSaver(tokenizer)
        self.callbacks = list(callbacks)
        self.bytes_per_token = bytes_per_token  # turns val loss into bits per byte
        self.out_dir = Path(cfg.out_dir)
        self.amp_dtype = autocast_dtype(cfg, self.device)
        self.params = [p for p in (parameters if parameters is not None else model.parameters()) if p.requires_grad]
        self.optimizer = make_optimizer(self.params, cfg, self.device)
        self.step = 0  # optimizer steps taken
        self.best: float | None = None
        self.bad_evals = 0  # evaluations since the last new best (early stopping)
        self.history: list[dict[str, Any]] = []  # eval records of this session
        self.should_stop = False  # a callback may set this
        self._fwd = self._wrap(model)
        self._tb = None
        self._peak: float | None = None

    # ---- setup ----
    def _wrap(self, model: nn.Module) -> nn.Module:
        fwd = model
        if self.config.compile:
            fwd = torch.compile(fwd)
        self._eval_fwd = fwd  # evaluation needs no gradient sync, so it skips the DDP wrapper
        if self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            # routed experts that no token picked this step get no gradient; DDP must be told to expect that
            moe = getattr(getattr(model, "config", None), "mlp", None) == "moe"
            fwd = DDP(fwd, device_ids=ids, find_unused_parameters=moe)
        return fwd

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        nb = self.device.type == "cuda"
        return {k: v.to(self.device, non_blocking=nb) if torch.is_tensor(v) else v for k, v in batch.items()}

    # ---- one optimizer step ----
    def train_step(self) -> dict[str, float]:
        cfg, dist = self.config, self.dist
        self.model.train()
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        count = torch.zeros((), device=self.device)
        tokens = 0
        for micro in range(cfg.grad_accum):
            batch = self._to_device(self.train_data.batch(self.step * cfg.grad_accum + micro, dist.rank, dist.world))
            tokens += batch["input_ids"].numel()
            # DDP averages gradients only on the last micro-batch of the step
            sync = micro == cfg.grad_accum - 1 or dist.world == 1
            ctx = contextlib.nullcontext() if sync else self._fwd.no_sync()
            with ctx:
                with self._autocast():
                    loss, n = self.loss_fn(self._fwd, batch)
                loss.backward()
            loss_sum += loss.detach().float()
            count += n
        # the losses were sums: divide the gradients by the number of counted items in the global batch
        # (DDP already divided by world, hence the factor)
        totals = dist.sum(torch.stack([loss_sum, count, torch.tensor(float(tokens), device=self.device)]))
        n_items = totals[1].clamp(min=1)
        scale = dist.world / n_items
        for p in self.params:
            if p.grad is not None:
                p.grad.mul_(scale)
        grad_norm = torch.zeros(())
        if cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.optimizer.step()
        self.step += 1
        return {"loss": (totals[0] / n_items).item(), "lr": lr, "grad_norm": float(grad_norm),
                "tokens": int(totals[2].item())}

    # ---- evaluation ----
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean validation loss (and bits per byte when the data knows its bytes per token), plus metrics_fn."""
        if self.val_data is None:
            return {}
        cfg, dist = self.config, self.dist
        self.model.eval()
        n_batches = max(1, min(cfg.eval_batches, len(self.val_data) // dist.world))
        loss_sum = torch.zeros((), device=self.device)
        count = torch.zeros((), device=self.device)
        for i in range(n_batches):
            batch = self._to_device(self.val_data.batch(i, dist.rank, dist.world))
            with self._autocast():
                loss, n = self.loss_fn(self._eval_fwd, batch)
            loss_sum += loss.float()
            count += n
        totals = dist.sum(torch.stack([loss_sum, count]))
        val_loss = (totals[0] / totals[1].clamp(min=1)).item()
        out = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
        if self.bytes_per_token:
            out["val_bpb"] = val_loss / math.log(2) / self.bytes_per_token
        if self.metrics_fn is not None:
            extra = self.metrics_fn(unwrap(self._fwd), self.val_data, self)
            out.update({k: float(v) for k, v in extra.items()})
        self.model.train()
        return out

    # ---- checkpoints ----
    def save_checkpoint(self, name: str = "last", with_state: bool = True) -> Path:
        """Write out_dir/NAME atomically: the saver's files, then trainer/ state; renamed into place last."""
        from gptlab.hf import replace_dir

        dest = self.out_dir / name
        stage = self.out_dir / f".{name}.tmp-step{self.step}"
        if self.dist.main:
            shutil.rmtree(stage, ignore_errors=True)
            self.saver.save(unwrap(self.model), stage)
            if with_state:
                (stage / "trainer").mkdir(parents=True, exist_ok=True)
        self.dist.barrier()
        if with_state:
            # every process has its own RNG stream (dropout); the optimizer state is the same on all of them
            rng = {"cpu": torch.get_rng_state()}
            if self.device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state(self.device)
            torch.save(rng, stage / "trainer" / f"rng-{self.dist.rank}.pt")
        self.dist.barrier()
        if self.dist.main:
            if with_state:
                torch.save(self.optimizer.state_dict(), stage / "trainer" / "optimizer.pt")
                state = {"step": self.step, "best": self.best, "bad_evals": self.bad_evals,
                         "world": self.dist.world, "config": dataclasses.asdict(self.config)}
                (stage / "trainer" / "state.json").write_text(json.dumps(state, indent=2) + "\n")
            replace_dir(stage, dest)
        self.dist.barrier()
        self._emit("checkpoint", {"step": self.step, "path": str(dest)})
        return dest

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore weights (through the saver), optimizer, step, best-so-far and RNG from a checkpoint dir."""
        path = Path(path)
        state_file = path / "trainer" / "state.json"
        if not state_file.is_file():
            raise GptlabError(f"{path} is not a resumable checkpoint (no trainer/state.json)")
        state = json.loads(state_file.read_text())
        if state.get("world", 1) != self.dist.world:
            raise GptlabError(f"{path} was written by {state['world']} processes; resume with the same number "
                              f"(this run has {self.dist.world})")
        self.saver.load(unwrap(self.model), path)
        # weights_only=True: optimizer state and RNG states are plain tensors and numbers, never pickled objects
        opt = torch.load(path / "trainer" / "optimizer.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(opt)
        rng_file = path / "trainer" / f"rng-{self.dist.rank}.pt"
        rng = torch.load(rng_file, map_location="cpu", weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.step, self.best, self.bad_evals = state["step"], state["best"], state["bad_evals"]

    def _resumable(self) -> Path | None:
        """out_dir/last, or the previous `last` when a crash came between the two renames of replace_dir."""
        last = self.out_dir / "last"
        if (last / "trainer" / "state.json").is_file():
            return last
        old = sorted(self.out_dir.glob(".last.old-*"), key=lambda p: p.stat().st_mtime)
        old = [p for p in old if (p / "trainer" / "state.json").is_file()]
        if old and self.dist.main:
            os.replace(old[-1], last)
        self.dist.barrier()
        return last if (last / "trainer" / "state.json").is_file() else None

    # ---- logging ----
    def _emit(self, event: str, metrics: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb(self, event, metrics)

    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.main:
            return
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, record["step"])

    def _open_logs(self, resumed: bool) -> None:
        if not self.dist.main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.out_dir.glob(".*.tmp-*"):  # staging dirs of a run that was killed mid-save
            shutil.rmtree(stale, ignore_errors=True)
        metrics = self.out_dir / "metrics.jsonl"
        if resumed and metrics.is_file():
            # drop what the interrupted run logged after its last checkpoint: it is about to be redone
            keep = [line for line in metrics.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= self.step]
            metrics.write_text("".join(line + "\n" for line in keep))
        elif metrics.is_file():
            metrics.unlink()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out_dir / "tb"))
        except ImportError:  # tensorboard is optional
            self._tb = None

    def _print(self, bar, text: str) -> None:
        if self.config.quiet or not self.dist.main:
            return
        if bar is not None:
            bar.write(text)
        else:
            print(text, flush=True)

    def _eval_and_track(self, bar) -> dict[str, float]:
        metrics = self.evaluate()
        if not metrics:
            return metrics
        record = {"step": self.step, **metrics}
        self._log(record)
        self.history.append(record)
        shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "val_ppl")
        self._print(bar, f"step {self.step}: {shown}")
        value = metrics.get(self.config.best_metric)
        if value is not None:
            better = self.best is None or (value > self.best if self.config.maximize else value < self.best)
            if better:
                self.best, self.bad_evals = value, 0
                if self.config.keep_best:
                    self.save_checkpoint("best", with_state=False)
            else:
                self.bad_evals += 1
        self._emit("eval", record)
        return metrics

    # ---- the run ----
    def fit(self) -> dict[str, Any]:
        """Train to max_steps (or until early stopping / stop_at_step); returns the last metrics."""
        cfg = self.config
        resumed = False
        last = self._resumable() if cfg.resume else None
        if last is not None:
            self.load_checkpoint(last)
            resumed = True
        else:
            torch.manual_seed(cfg.seed + self.dist.rank)  # a dropout stream per process, reproducible
        self._open_logs(resumed)
        if resumed:
            self._print(None, f"resumed from {last} at step {self.step}")
        elif cfg.resume:
            self._print(None, f"nothing to resume in {self.out_dir}; starting from step 0")
        model_cfg = getattr(unwrap(self.model), "config", None)
        seq_len = None
        fpt = None
        if isinstance(model_cfg, Config):
            probe = self.train_data.batch(0, self.dist.rank, self.dist.world)["input_ids"]
            seq_len = probe.shape[-1]
            fpt = flops_per_token(model_cfg, seq_len)
            self._peak = cfg.peak_tflops * 1e12 or measure_peak_flops(self.device, self.amp_dtype)

        from tqdm.auto import tqdm

        show_bar = not cfg.quiet and self.dist.main and sys.stderr.isatty()
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", dynamic_ncols=True, disable=not show_bar)
        last_metrics: dict[str, Any] = {}
        t_last, tok_since = time.perf_counter(), 0
        eval_due = cfg.eval_every or cfg.max_steps
        save_due = cfg.save_every or eval_due
        try:
            while self.step < cfg.max_steps and not self.should_stop:
                m = self.train_step()
                tok_since += m["tokens"]
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    _sync(self.device)
                    dt = time.perf_counter() - t_last
                    tps = tok_since / dt if dt > 0 else 0.0
                    m["tok_per_s"] = tps
                    if fpt and self._peak:
                        m["mfu"] = tps / self.dist.world * fpt / self._peak
                    t_last, tok_since = time.perf_counter(), 0
                    self._log({"step": self.step, **{k: v for k, v in m.items() if k != "tokens"}})
                    post = {"loss": f"{m['loss']:.3f}", "tok/s": f"{tps:,.0f}"}
                    if "mfu" in m:
                        post["mfu"] = f"{100 * m['mfu']:.1f}%"
                    bar.set_postfix(post, refresh=False)
                    if not show_bar:
                        self._print(None, f"step {self.step}/{cfg.max_steps}: loss {m['loss']:.4f}  "
                                          f"lr {m['lr']:.2e}  {tps:,.0f} tok/s")
                last_metrics = m
                self._emit("step", {"step": self.step, **m})
                if self.step % eval_due == 0 and self.step < cfg.max_steps:
                    last_metrics = {**m, **self._eval_and_track(bar)}
                    if cfg.patience and self.bad_evals >= cfg.patience:
                        self._print(bar, f"early stop: no better {cfg.best_metric} in {cfg.patience} evaluations")
                        self.should_stop = True
                if self.step % save_due == 0 and self.step < cfg.max_steps:
                    self.save_checkpoint("last")
                if cfg.stop_at_step and self.step >= cfg.stop_at_step and self.step < cfg.max_steps:
                    self.save_checkpoint("last")
                    self._print(bar, f"stopped at step {self.step} (stop_at_step); --resume continues")
                    return {**last_metrics, "stopped": True}
            if not (self.history and self.history[-1]["step"] == self.step):  # early stop just evaluated
                last_metrics = {**last_metrics, **self._eval_and_track(bar)}
            else:
                last_metrics = {**last_metrics, **{k: v for k, v in self.history[-1].items() if k != "step"}}
            self.save_checkpoint("last")
        finally:
            bar.close()
            if self._tb is not None:
                self._tb.close()
        return last_metrics


# ---------------------------------------------------------------------------------------------------------
# pretraining: `gptlab train`


@dataclass
class PretrainModel(Config):
    """A Config whose defaults are the model `gptlab train` builds: GPT-2 layout, sized for ~5 minutes on 2 CPU
    cores. Being its own class, a recipe's `model:` section (or --model.n_layer=6) changes only what it names
    and keeps these defaults for the rest.

    1.3M parameters (half of them the 4096 x 128 tied embedding); at ~6-7k tokens/s on 2 cores, 750 steps of
    16 x 128 tokens (1.5M tokens, ~3 passes over python-docs) fit the budget. At this budget many small steps
    beat fewer large ones: batch 16 x 800 steps reached 1.98 val bpb, 32 x 400 steps 2.09.
    """

    name: str = "gptlab-python-docs"
    model_type: str = "gpt2"  # HF model_type: learned positions, LayerNorm, GELU; opens in transformers as is
    vocab_size: int = 4096  # replaced by the data's vocabulary
    block_size: int = 128  # context length
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128


def default_model() -> PretrainModel:
    return PretrainModel()


@dataclass
class TrainConfig(LoopConfig):
    """A pretraining recipe: data, model and the loop settings of LoopConfig."""

    data: str = "python-docs"  # prepared data dir (manifest.json), or a corpus to prepare: python-docs, text/JSONL files or folders
    tokenizer: str | None = None  # tokenizer dir used to prepare a corpus; None trains one with vocab_size
    vocab_size: int = 4096  # vocabulary of a tokenizer trained here
    data_cache: str = "out/data"  # where corpora prepared on the fly are cached
    val_fraction: float = 0.02  # share of the corpus held out for validation when preparing it here
    preset: str | None = None  # start from a named preset (model.* fields that differ from the defaults override it)
    init_from: str | None = None  # start from the weights of this HF model dir instead of random init
    model: PretrainModel = field(default_factory=default_model)
    seq_len: int = 0  # tokens per training sequence (0 = the model's block_size)
    sample_prompt: str = "The with statement"  # prompt of the sample printed at the end ("" = none)
    sample_tokens: int = 120  # tokens in that sample
    out_dir: str = "out/python-docs"  # checkpoints (last/, best/, final/), metrics.jsonl and TensorBoard logs
    max_steps: int = 750  # optimizer steps; the learning-rate schedule ends here
    batch_size: int = 16  # sequences per micro-batch per process
    lr: float = 3e-3  # peak learning rate
    min_lr: float = 3e-4  # learning rate at the end of the cosine decay
    warmup_steps: int = 30  # linear warm-up from 0 to lr
    eval_every: int = 150  # evaluate on the validation data every N steps (0 = only at the end)


def _model_config(cfg: TrainConfig, vocab_size: int) -> Config:
    if cfg.preset:
        m = cfg.model
        defaults = dataclasses.asdict(default_model())
        # fields __post_init__ derived from the small default's sizes are not choices of the user
        derived = {"n_kv_head": m.n_head, "head_dim": m.n_embd // m.n_head, "intermediate_size": 4 * m.n_embd}
        chosen = {k: v for k, v in dataclasses.asdict(m).items()
                  if k != "name" and v != defaults[k] and not (k in derived and v == derived[k])}
        model_cfg = Config.from_name(cfg.preset, **chosen)
    else:
        model_cfg = cfg.model
    return model_cfg.replace(vocab_size=vocab_size)


def build_model(cfg: TrainConfig, vocab_size: int, eos_id: int | None):
    from gptlab.model import GPT

    if cfg.init_from:
        from gptlab.hf import load

        model = load(cfg.init_from, dtype=torch.float32)
        if model.config.vocab_size < vocab_size:
            raise GptlabError(f"{cfg.init_from} has a vocabulary of {model.config.vocab_size}, smaller than the "
                              f"data's {vocab_size}")
        return model.train()
    model_cfg = _model_config(cfg, vocab_size)
    model_cfg = model_cfg.replace(bos_token_id=eos_id, eos_token_id=eos_id)
    torch.manual_seed(cfg.seed)
    return GPT(model_cfg)


def run_pretraining(cfg: TrainConfig) -> dict[str, Any]:
    """Everything `gptlab train` does: prepare data (cached), build the model, train, save final/, sample."""
    from gptlab.data import TokenWindows, ensure_prepared, read_manifest
    from gptlab.tokenizer import load_tokenizer

    device = pick_device(cfg.device)
    dist = init_distributed(device)
    t0 = time.perf_counter()
    data_dir = ensure_prepared(cfg.data, tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size, cache=cfg.data_cache,
                               val_fraction=cfg.val_fraction, quiet=cfg.quiet or not dist.main,
                               is_main=dist.main, barrier=dist.barrier)
    manifest = read_manifest(data_dir)
    tok = load_tokenizer(data_dir / manifest["tokenizer"])
    model = build_model(cfg, manifest["vocab_size"], tok.eos_id)
    seq_len = cfg.seq_len or model.config.block_size
    if seq_len > model.config.block_size:
        raise GptlabError(f"seq_len={seq_len} exceeds the model's block_size={model.config.block_size}")
    train = TokenWindows(data_dir, "train", seq_len, cfg.batch_size, seed=cfg.seed)
    val = TokenWindows(data_dir, "val", seq_len, cfg.batch_size, seed=cfg.seed, shuffle=False)
    if dist.main and not cfg.quiet:
        n = sum(p.numel() for p in model.parameters())
        print(f"data {data_dir}: {manifest['splits']['train']['tokens']:,} train / "
              f"{manifest['splits']['val']['tokens']:,} val tokens; model {n / 1e6:.2f}M parameters "
              f"({model.config.n_layer} layers, {model.config.n_embd} wide, context {seq_len})", flush=True)
    trainer = Trainer(model, train, val, cfg, tokenizer=tok, device=device, dist=dist,
                      bytes_per_token=manifest["splits"]["val"]["bytes"] / manifest["splits"]["val"]["tokens"])
    result = trainer.fit()
    if result.get("stopped"):
        return result
    final = trainer.save_checkpoint("final", with_state=False)
    result["wall_s"] = time.perf_counter() - t0
    if dist.main and not cfg.quiet:
        bpb = result.get("val_bpb")
        print(f"saved {final} ({result['wall_s']:.0f} s"
              + (f", val bits per byte {bpb:.3f}" if bpb is not None else "") + ")", flush=True)
        if cfg.sample_prompt and cfg.sample_tokens > 0:
            print_sample(unwrap(model), tok, cfg.sample_prompt, cfg.sample_tokens, cfg.seed)
    return result


def print_sample(model: nn.Module, tok, prompt: str, n_tokens: int, seed: int) -> None:
    try:
        from gptlab.generate import generate
    except ImportError:  # generation is a separate module; training does not depend on it
        return
    model.eval()
    text = generate(model, tok, prompt, max_new_tokens=n_tokens, temperature=0.8, top_k=50, seed=seed)
    print(f"--- sample ---\n{prompt}{text}\n--------------", flush=True)


@command("train")
def train_command(config: TrainConfig) -> int:
    """Pretrain a model: with no arguments, a small GPT-2 on the python-docs corpus in about 5 minutes on CPU.

    Saves HF-format model dirs under out_dir (final/, best/, last/ with trainer state for --resume), prints
    validation bits per byte as it goes and a sample at the end. Under `torchrun --nproc_per_node=N` the
    same command trains data-parallel.

    Args:
        config: a TrainConfig recipe (YAML) and/or --field=value overrides, e.g. --model.n_layer=6
    """
    run_pretraining(config)
    return 0
