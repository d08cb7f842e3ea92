"""One training loop for pretraining and every fine-tuning method: `Trainer`.

The loop is generic; what differs between methods plugs in:

    from gptlab.train import LoopConfig, Trainer
    trainer = Trainer(
        model,                       # a gptlab GPT (or any nn.Module the hooks understand)
        train_data,                  # BatchSource: .batch(index, rank, world) -> {"input_ids", "labels", ...}
        val_data,                    # BatchSource or None; evaluated every `eval_every` steps
        LoopConfig(max_steps=200, lr=3e-4, out_dir="out/run"),   # or any dataclass that extends LoopConfig
        tokenizer=tok,               # saved with each checkpoint by the default saver
        loss_fn=next_token_loss,     # (model, batch) -> (summed loss, number of items it sums over): losses.py
        parameters=None,             # the parameters to train; default: all with requires_grad
        metrics_fn=None,             # (model, val_data, trainer) -> {"name": float}, extra eval metrics
        saver=HFSaver(tok),          # .save(model, dir) / .load(model, dir); default: full HF model dir (savers.py)
        callbacks=[],                # fn(trainer, event, metrics) on "step" / "eval" / "checkpoint"
        flops_per_token=None,        # training FLOPs per token (gptlab.models.stats): logs MFU when given
    )
    result = trainer.fit()           # resumes from out_dir/last when config.resume is set

Conventions the hooks can rely on:
- A batch is a dict of tensors. `labels` are next-token targets already aligned with `input_ids`:
  labels[b, t] is the token that should follow input_ids[b, :t+1]; -100 marks a position left out of the
  loss (a prompt token, padding). For pretraining windows, input_ids = w[:-1] and labels = w[1:].
- `loss_fn` returns a SUM and a COUNT; the trainer divides by the count summed over gradient-accumulation
  micro-batches and over processes, so every counted item weighs the same however the batch is split
  (exactly the loss of one big batch; masked SFT batches of uneven length included). It may return a third
  value, {name: summed metric} (DPO's rewards and accuracy), divided by the same count and logged.
- Batches are addressed by number: micro-batch `i = step * grad_accum + micro` of rank `rank` in a world
  of `world` processes. A resumed run, or the same global batch split across processes, therefore reads
  exactly the same examples as an uninterrupted single-process run. Validation batches are numbered 0..
- The model the hooks receive may be wrapped (DDP, torch.compile); `unwrap(model)` gives the module.
- Checkpoints are dirs: out_dir/last (for --resume), out_dir/best (best `best_metric`, when keep_best),
  out_dir/final. Each holds what `saver` writes (an HF model dir by default, so `gptlab generate DIR`
  and transformers open it) plus `trainer/` (state.json, optimizer.pt, rng-<rank>.pt). A checkpoint is
  staged in a hidden temporary dir and renamed into place, so a crash never leaves a half-written one.

Distributed: run the same command under `torchrun --nproc_per_node=N` (runtime.py); gradients are
averaged by DistributedDataParallel. The pretraining recipe is pretrain.py, fine-tuning finetune.py.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import torch
import torch.nn as nn

from gptlab.errors import GptlabError
from gptlab.formats.files import RunLock, read_json, replace_dir
from gptlab.models import stats
from gptlab.train.guards import RUN_ENTRIES, check_loop_config
from gptlab.train.losses import next_token_loss
from gptlab.train.budget import UNSET, Budget
from gptlab.train import fsdp
from gptlab.train.optim import lr_at, make_optimizer
from gptlab.train.runtime import (Dist, autocast_dtype, compile_pays, init_distributed, measure_peak_flops,
                                  pick_device, sync, unwrap)
from gptlab.train.savers import HFSaver, load_optimizer, restore_rng


def _add(sums: dict[str, torch.Tensor], more: list) -> None:
    """Add a loss hook's optional third value, {name: summed metric}, into `sums` (divided by the count later)."""
    for k, v in (more[0] if more else {}).items():
        sums[k] = sums.get(k, 0) + v.detach().float()


# ---------------------------------------------------------------------------------------------------------
# configuration


@dataclass
class LoopConfig:
    """What every training run needs, pretraining or fine-tuning (extend it with a method's own fields)."""

    GROUP: ClassVar[str] = "training loop"

    out_dir: str = "out/run"  # checkpoints, metrics.jsonl
    max_steps: int = 1000  # optimizer steps; the schedule ends here
    batch_size: int = 8  # sequences per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # learning rate at the end of the decay
    warmup_steps: int = 100  # linear warm-up from 0 to lr
    schedule: Literal["cosine", "constant", "linear"] = "cosine"  # decay
    weight_decay: float = 0.1  # AdamW decay of 2-D weights
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    optimizer: Literal["adamw", "muon"] = "adamw"  # muon: Muon for hidden matrices
    muon_lr: float = 0.02  # Muon's peak learning rate
    grad_clip: float = 1.0  # clip the gradient norm (0 = off)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # bf16 autocast; auto = where it is fast
    compile: Literal["auto", "on", "off"] = "auto"  # torch.compile; auto: where it pays
    fsdp: bool = False  # shard weights, grads, moments (FSDP2)
    device: str = "auto"  # auto, cpu, cuda, cuda:1, mps
    seed: int = 1337  # init, data order and dropout
    eval_every: int = 100  # steps between evals (0 = at the end)
    eval_batches: int = 20  # validation batches per evaluation
    log_every: int = 10  # steps between metrics.jsonl records
    save_every: int = 0  # steps between saves of last/ (0 = at evals)
    keep_best: bool = True  # keep the best checkpoint in best/
    best_metric: str = "val_loss"  # metric for best/ and early stopping
    maximize: bool = False  # larger best_metric is better (accuracy)
    patience: int = 0  # stop after N evals not improving (0 = never)
    resume: bool = False  # continue from out_dir/last
    overwrite: bool = False  # replace the run already in out_dir
    stop_at_step: int = 0  # end this session at this step (0 = off)
    skip_nonfinite: int = 0  # skip up to N non-finite steps (0 = stop)
    quiet: bool = False  # no progress bar or log lines
    time_budget: str = ""  # e.g. 4m, 240: sets max_steps to end on time
    peak_tflops: float = 0.0  # device peak for MFU (0 = measure it)

def _shown(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


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
        flops_per_token: float | None = None,
        find_unused_parameters: bool = False,
    ) -> None:
        self.config = cfg = config
        check_loop_config(cfg)
        self.device = device or pick_device(cfg.device)
        self.dist = dist or init_distributed(self.device)
        self.fsdp_template = None  # with --fsdp over several processes: the model's weightless template (fsdp.py)
        if cfg.fsdp and self.dist.world > 1:  # sharded first: only each process's shards move to the device
            self.model = model
            self.fsdp_template, parameters = fsdp.shard(model, parameters, self.device, self.dist.world)
        else:
            self.model = model.to(self.device)
        self.train_data, self.val_data = train_data, val_data
        self.tokenizer = tokenizer
        self.loss_fn, self.metrics_fn = loss_fn, metrics_fn
        self.saver = saver or HFSaver(tokenizer)
        self.callbacks = list(callbacks)
        self.bytes_per_token = bytes_per_token  # turns val loss into bits per byte
        self.out_dir = Path(cfg.out_dir)
        self.amp_dtype = autocast_dtype(cfg.precision, self.device)
        self.flops_per_token = flops_per_token  # for MFU
        self.find_unused_parameters = find_unused_parameters  # DDP: e.g. routed experts no token picked
        self._lock: RunLock | None = None
        self.params = [p for p in (parameters if parameters is not None else model.parameters()) if p.requires_grad]
        self.optimizer = make_optimizer(self.params, cfg, self.device, model)
        self.step = 0  # optimizer steps taken
        self.skipped_steps = 0  # steps skipped for a non-finite loss or gradient (skip_nonfinite)
        self.best: float | None = None
        self.bad_evals = 0  # evaluations since the last new best (early stopping)
        self.history: list[dict[str, Any]] = []  # eval records of this session
        self.train_s = 0.0  # seconds this session spent in optimizer steps (evaluations and saves left out)
        self.should_stop = False  # a callback may set this
        self._fwd = self._wrap(model)
        self._tb = None
        self._peak: float | None = None

    # ---- setup ----
    def _wrap(self, model: nn.Module) -> nn.Module:
        fwd = model
        if compile_pays(self.config.compile, self.device, self.amp_dtype):
            fwd = torch.compile(fwd)
        self._eval_fwd = fwd  # evaluation needs no gradient sync, so it skips the DDP wrapper
        if self.dist.world > 1 and self.fsdp_template is None:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            fwd = DDP(fwd, device_ids=ids, find_unused_parameters=self.find_unused_parameters)
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
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        count = torch.zeros((), device=self.device)
        extras: dict[str, torch.Tensor] = {}
        tokens = 0
        for micro in range(cfg.grad_accum):
            batch = self._to_device(self.train_data.batch(self.step * cfg.grad_accum + micro, dist.rank, dist.world))
            tokens += batch["input_ids"].numel()
            # DDP averages gradients only on the last micro-batch of the step
            last_micro = micro == cfg.grad_accum - 1 or dist.world == 1
            with self._gradient_sync(last_micro):
                with self._autocast():
                    loss, n, *more = self.loss_fn(self._fwd, batch)
                loss.backward()
            loss_sum += loss.detach().float()
            count += n
            _add(extras, more)
        # the losses were sums: divide the gradients by the number of counted items in the global batch
        # (DDP already divided by world, hence the factor)
        names = sorted(extras)
        totals = dist.sum(torch.stack([loss_sum, count, torch.tensor(float(tokens), device=self.device),
                                       *(extras[k] for k in names)]))
        n_items = totals[1].clamp(min=1)
        scale = dist.world / n_items
        for p in self.params:
            if p.grad is not None:
                p.grad.mul_(scale)
        # clip_grad_norm_ with an infinite bound measures without clipping: a non-finite loss or gradient must
        # stop the run before the optimizer writes it into the weights
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        if self.fsdp_template is not None:
            grad_norm = fsdp.full_value(grad_norm)
        loss_value = totals[0] / n_items
        if not (torch.isfinite(loss_value) and torch.isfinite(grad_norm)):
            what = "loss" if not torch.isfinite(loss_value) else "gradient norm"
            value = float(loss_value if what == "loss" else grad_norm)
            if self.skipped_steps >= cfg.skip_nonfinite:
                more = f" after skipping {self.skipped_steps} such step(s)" if self.skipped_steps else ""
                raise GptlabError(f"step {self.step + 1}: the {what} is {value}{more}; training stopped before this "
                                  f"step changed the weights (checkpoints on disk are from earlier steps). Lower "
                                  f"--lr, or check the data (--skip-nonfinite N skips up to N such steps)")
            self.skipped_steps += 1  # the batch is used up, the weights and the optimizer's moments untouched
            self.optimizer.zero_grad(set_to_none=True)
            self._print(None, f"step {self.step + 1}: the {what} is {value}; step skipped "
                              f"({self.skipped_steps} of at most {cfg.skip_nonfinite})")
            self.step += 1
            self._log({"step": self.step, "skipped_nonfinite": what, "skipped_steps": self.skipped_steps})
            return {"loss": float("nan"), "lr": lr, "grad_norm": float("nan"), "tokens": int(totals[2].item()),
                    "skipped": self.skipped_steps}
        self.optimizer.step()
        self.step += 1
        return {"loss": (totals[0] / n_items).item(), "lr": lr, "grad_norm": float(grad_norm),
                "tokens": int(totals[2].item()), **{k: (totals[3 + i] / n_items).item() for i, k in enumerate(names)}}

    def _gradient_sync(self, on: bool):
        """Average gradients over processes on this micro-batch's backward, or (accumulating) not yet."""
        if self.fsdp_template is not None:
            self.model.set_requires_gradient_sync(on)
        if on or self.dist.world == 1 or self.fsdp_template is not None:
            return contextlib.nullcontext()
        return self._fwd.no_sync()

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
        extras: dict[str, torch.Tensor] = {}
        for i in range(n_batches):
            batch = self._to_device(self.val_data.batch(i, dist.rank, dist.world))
            with self._autocast():
                loss, n, *more = self.loss_fn(self._eval_fwd, batch)
            loss_sum += loss.float()
            count += n
            _add(extras, more)
        names = sorted(extras)
        totals = dist.sum(torch.stack([loss_sum, count, *(extras[k] for k in names)]))
        val_loss = (totals[0] / totals[1].clamp(min=1)).item()
        out = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
        out.update({f"val_{k}": (totals[2 + i] / totals[1].clamp(min=1)).item() for i, k in enumerate(names)})
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
        dest = self.out_dir / name
        stage = self.out_dir / f".{name}.tmp-step{self.step}"
        # --fsdp: every rank gathers the weights with rank 0, which writes them as an ordinary model
        whole = unwrap(self.model) if self.fsdp_template is None else \
            fsdp.full_replica(self.model, self.fsdp_template, self.dist.main)
        if self.dist.main:
            shutil.rmtree(stage, ignore_errors=True)
            self.saver.save(whole, stage)
            if with_state:
                (stage / "trainer").mkdir(parents=True, exist_ok=True)
        self.dist.barrier()
        if with_state:
            # every process has its own RNG stream (dropout); the optimizer state is the same on all of them
            rng = {"cpu": torch.get_rng_state()}
            if self.device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state(self.device)
            torch.save(rng, stage / "trainer" / f"rng-{self.dist.rank}.pt")
            if self.fsdp_template is not None:  # each rank's pieces of the weights and moments
                fsdp.save_shards(self.model, self.optimizer, stage / "trainer", self.dist.rank)
        self.dist.barrier()
        if self.dist.main:
            if with_state and self.fsdp_template is None:
                torch.save(self.optimizer.state_dict(), stage / "trainer" / "optimizer.pt")
            if with_state:
                state = {"step": self.step, "best": self.best, "bad_evals": self.bad_evals,
                         "skipped_steps": self.skipped_steps,
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
        state = read_json(state_file)
        for key, kinds in (("step", int), ("bad_evals", int), ("best", (int, float, type(None)))):
            if key not in state or isinstance(state[key], bool) or not isinstance(state[key], kinds):
                raise GptlabError(f"{state_file}: {key!r} is missing or not a number; the checkpoint is damaged")
        saved = state.get("config") if isinstance(state.get("config"), dict) else {}
        self._saved_config = saved
        for key in getattr(self.config, "RESUME_SAME", ()):  # settings a checkpoint's files depend on
            if key in saved and saved[key] != getattr(self.config, key):
                raise GptlabError(f"{path} was written by a run with --{key.replace('_', '-')} {_shown(saved[key])}, "
                                  f"this one has {_shown(getattr(self.config, key))}; resume with the same setting, "
                                  f"or start a new run with --overwrite")
        if state.get("world", 1) != self.dist.world:
            raise GptlabError(f"{path} was written by {state['world']} processes; resume with the same number "
                              f"(this run has {self.dist.world})")
        if self.fsdp_template is not None:
            fsdp.load_shards(self.model, self.optimizer, path / "trainer", self.dist.rank)
        else:
            self.saver.load(unwrap(self.model), path)
            load_optimizer(self.optimizer, path / "trainer" / "optimizer.pt", self.device)
        restore_rng(path / "trainer" / f"rng-{self.dist.rank}.pt", self.device)
        self.step, self.best, self.bad_evals = state["step"], state["best"], state["bad_evals"]
        skipped = state.get("skipped_steps", 0)
        self.skipped_steps = skipped if isinstance(skipped, int) and not isinstance(skipped, bool) else 0

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

    def _check_fresh_out_dir(self) -> None:
        """A new run must not silently replace a finished or interrupted one, nor the user's own files."""
        out, cfg = self.out_dir, self.config
        if not out.is_dir():
            return
        ours = [n for n in RUN_ENTRIES if (out / n).exists()]
        others = sorted(p.name for p in out.iterdir() if p.name not in RUN_ENTRIES and not p.name.startswith("."))
        # --resume of a run killed before its first checkpoint: only its logs exist, and it starts over
        restart = cfg.resume and set(ours) <= {"metrics.jsonl", "tb"}
        if ours and not cfg.overwrite and not restart:
            raise GptlabError(f"{out} holds a run ({', '.join(ours)}); pass --resume to continue it, --overwrite to "
                              f"start over, or choose another --out-dir")
        if others and not cfg.overwrite:
            raise GptlabError(f"{out} holds files that are not a gptlab run ({', '.join(others[:3])}); choose "
                              f"another --out-dir (or --overwrite to train there anyway)")
        for n in ours:  # --overwrite (or that restart): the earlier run's own checkpoints and logs go, nothing else
            target = out / n
            shutil.rmtree(target) if target.is_dir() else target.unlink()

    def release(self) -> None:
        """Let another process use out_dir (fit holds it until this, or until the process ends)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

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
        record = {"step": self.step, **metrics, "train_s": round(self.train_s, 3)}  # time to loss, evals left out
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
        """Train to max_steps (or until early stopping / stop_at_step); returns the last metrics. A run that
        fails lets go of out_dir (its lock, and the dir itself when this run made it and wrote nothing)."""
        try:
            return self._fit()
        except BaseException:
            if self._lock is not None:
                self._lock.abandon()
                self._lock = None
            raise

    def _fit(self) -> dict[str, Any]:
        cfg = self.config
        if self.dist.main:
            self._lock = self._lock or RunLock(self.out_dir)
        resumed = False
        last = self._resumable() if cfg.resume else None
        if last is None and self.dist.main:
            self._check_fresh_out_dir()
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
        fpt = self.flops_per_token
        if fpt:
            self._peak = cfg.peak_tflops * 1e12 or measure_peak_flops(self.device, self.amp_dtype)
        budget = Budget.start(self, resumed)  # time_budget: max_steps set after a few measured steps
        cfg = self.config

        from tqdm.auto import tqdm

        show_bar = not cfg.quiet and self.dist.main and sys.stderr.isatty()
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", dynamic_ncols=True, disable=not show_bar)
        last_metrics: dict[str, Any] = {}
        t_last, tok_since = time.perf_counter(), 0
        eval_due = cfg.eval_every or cfg.max_steps
        save_due = cfg.save_every or eval_due
        try:
            while self.step < cfg.max_steps and not self.should_stop:
                t_step = time.perf_counter()
                m = self.train_step()
                self.train_s += time.perf_counter() - t_step
                if budget is not None and budget.after_step(self):
                    cfg = self.config
                    eval_due = cfg.eval_every or cfg.max_steps
                    save_due = cfg.save_every or eval_due
                    bar.total = cfg.max_steps
                tok_since += m["tokens"]
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    sync(self.device)
                    dt = time.perf_counter() - t_last
                    tps = tok_since / dt if dt > 0 else 0.0
                    m["tok_per_s"] = tps
                    if fpt and self._peak:
                        m["mfu"] = stats.mfu(tps / self.dist.world, fpt, self._peak)
                    t_last, tok_since = time.perf_counter(), 0
                    self._log({"step": self.step, **{k: v for k, v in m.items() if k != "tokens"}})
                    post = {"loss": f"{m['loss']:.3f}", "tok/s": f"{tps:,.0f}"}
                    if "mfu" in m:
                        post["mfu"] = f"{100 * m['mfu']:.1f}%"
                    bar.set_postfix(post, refresh=False)
                    if not show_bar:
                        total = cfg.max_steps if cfg.max_steps < UNSET else "?"  # ?: a time budget still measuring
                        self._print(None, f"step {self.step}/{total}: loss {m['loss']:.4f}  "
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
