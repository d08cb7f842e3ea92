"""`gptlab finetune`: full or LoRA fine-tuning for instruction SFT, sequence classification or plain LM.

Every combination runs on the one training loop (`train.Trainer`); a method only chooses what plugs in:

    method  which parameters train        what a checkpoint holds (saver)
    full    all of them                   an HF model dir (+ the classifier's score.weight)
    lora    the adapters (+ score head)    a PEFT adapter dir (adapter_config.json + adapter_model.safetensors)

    task      data rows                           loss (loss_fn)                        extra eval metrics
    sft       chat / instruction / prompt rows   next-token CE on assistant tokens      -
    lm        {"text"}                            next-token CE on every token           -
    classify  {"text", "label"}                   CE of the score head, last token        accuracy, P/R/F1

So resume (--resume), early stopping (--patience) with out_dir/best, data-parallel runs under torchrun
and the logs are those of pretraining. Python:

    from gptlab.finetune import FinetuneConfig, finetune
    result = finetune("path/to/model", FinetuneConfig(data="train.jsonl", method="lora", task="sft"))
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab.classify import SequenceClassifier, load_class_rows, metrics_from_confusion
from gptlab.cli import command
from gptlab.errors import GptlabError
from gptlab.train import LoopConfig, Trainer, init_distributed, next_token_loss, pick_device, unwrap

Method = Literal["full", "lora"]
Task = Literal["sft", "classify", "lm"]


@dataclass
class FinetuneConfig(LoopConfig):
    """A fine-tuning recipe: data, method, task and the loop settings of LoopConfig."""

    data: str = ""  # training data: a JSONL file (see docs/finetune.md for the row shapes)
    val_data: str = ""  # validation JSONL ("" = hold out val_fraction of data)
    val_fraction: float = 0.1  # share of data held out for validation when val_data is not given (0 = none)
    method: Method = "lora"  # full: train every weight; lora: train low-rank adapters only
    task: Task = "sft"  # sft: chat/instruction rows, loss on answers; classify: text + label; lm: plain text
    lora_targets: list[str] = field(default_factory=lambda: ["qkv"])  # HF (q_proj, c_attn) or gptlab (qkv, mlp.fc) names, or all-linear
    lora_r: int = 8  # adapter rank
    lora_alpha: float = 16.0  # adapter scale is lora_alpha / lora_r
    lora_dropout: float = 0.0  # dropout on the adapters' input
    rslora: bool = False  # scale by lora_alpha / sqrt(lora_r) (rank-stabilised LoRA)
    max_len: int = 512  # tokens per example; longer ones are cut (lm: split); 0 = the model's context
    pack: bool = False  # sft/lm: pack short examples into rows of max_len tokens
    skip_bad_rows: bool = False  # count and skip malformed rows instead of stopping at the first
    save_merged: bool = False  # lora: also write out_dir/merged, a full model with the adapter folded in
    out_dir: str = "out/finetune"  # checkpoints (last/, best/, final/, merged/) and metrics.jsonl
    max_steps: int = 300  # optimizer steps; the learning-rate schedule ends here
    lr: float = 2e-4  # peak learning rate
    min_lr: float = 2e-5  # learning rate at the end of the cosine decay
    warmup_steps: int = 20  # linear warm-up from 0 to lr
    weight_decay: float = 0.0  # AdamW decay on 2-D weights (fine-tuning usually uses none)
    beta2: float = 0.999
    eval_every: int = 50  # evaluate on the validation data every N steps (0 = only at the end)


@dataclass
class FinetuneResult:
    model: nn.Module  # the trained GPT (with its LoRA layers) or SequenceClassifier
    tokenizer: Any
    metrics: dict[str, Any]  # the last step's and evaluation's metrics
    out_dir: Path
    labels: list[str] | None = None  # classification: class id -> name
    stopped: bool = False  # ended early by stop_at_step (resume continues)


# ---------------------------------------------------------------------------------------------------------
# hooks for the Trainer


def _gpt(model: nn.Module) -> nn.Module:
    return model.model if isinstance(model, SequenceClassifier) else model


def classification_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of the class logits, and the number of rows (the Trainer averages)."""
    logits = model(batch["input_ids"])  # (B, K)
    return F.cross_entropy(logits.float(), batch["labels"], reduction="sum"), batch["labels"].numel()


class ClassificationMetrics:
    """Accuracy and per-class precision / recall / F1 over the whole validation split (summed over processes)."""

    def __init__(self, names: list[str]) -> None:
        self.names = names

    @torch.no_grad()
    def __call__(self, model: nn.Module, val_data, trainer: Trainer) -> dict[str, float]:
        k, dist = len(self.names), trainer.dist
        conf = torch.zeros(k, k, dtype=torch.long, device=trainer.device)
        for i in range(math.ceil(len(val_data) / dist.world)):
            if i * dist.world + dist.rank >= len(val_data):  # batches are numbered across processes
                break
            batch = val_data.batch(i, dist.rank, dist.world)
            preds = model(batch["input_ids"].to(trainer.device)).argmax(-1)
            labels = batch["labels"].to(trainer.device)
            conf.index_put_((labels, preds), torch.ones_like(labels), accumulate=True)
        return metrics_from_confusion(dist.sum(conf), self.names)


class AdapterSaver:
    """LoRA checkpoints: only the adapter (and a classifier's head), in PEFT's layout."""

    def __init__(self, tokenizer, base_model: str | None, labels: list[str] | None = None) -> None:
        self.tokenizer, self.base_model, self.labels = tokenizer, base_model, labels

    def save(self, model: nn.Module, path: Path) -> None:
        from gptlab.classify import hf_extras
        from gptlab.lora import save_adapter

        extra, task_type = None, "CAUSAL_LM"
        if isinstance(model, SequenceClassifier):
            extra, _ = hf_extras(model, self.labels)
            task_type = "SEQ_CLS"
        save_adapter(_gpt(model), path, base_model=self.base_model, task_type=task_type, extra_tensors=extra,
                     tokenizer=self.tokenizer)

    def load(self, model: nn.Module, path: Path) -> None:
        from gptlab.lora import load_adapter_weights

        extras = load_adapter_weights(_gpt(model), path)
        if isinstance(model, SequenceClassifier):
            if "score.weight" not in extras:
                raise GptlabError(f"{path} lacks the classifier head score.weight")
            with torch.no_grad():
                model.score.weight.copy_(extras["score.weight"])


class ClassifierSaver:
    """Full fine-tuning of a classifier: an HF dir transformers' AutoModelForSequenceClassification opens."""

    def __init__(self, tokenizer, labels: list[str]) -> None:
        self.tokenizer, self.labels = tokenizer, labels

    def save(self, model: nn.Module, path: Path) -> None:
        from gptlab.classify import save_classifier

        save_classifier(model, path, self.labels, tokenizer=self.tokenizer)

    def load(self, model: nn.Module, path: Path) -> None:
        from gptlab.classify import load_classifier

        p = next(model.parameters())
        loaded, _ = load_classifier(path, dtype=p.dtype, device=p.device)
        with torch.no_grad():
            model.load_state_dict(loaded.state_dict(), strict=True)


# ---------------------------------------------------------------------------------------------------------
# data


def _pad_id(tok) -> int:
    for i in (tok.pad_id, tok.eos_id):
        if i is not None:
            return i
    raise GptlabError("the tokenizer has neither a pad nor an EOS token to pad batches with")


def _datasets(cfg: FinetuneConfig, tok, max_len: int):
    """(train examples, val examples, collate, class names or None, a summary line)."""
    from gptlab import sft
    if not cfg.data:
        raise GptlabError("no training data: pass --data FILE.jsonl")
    pad = _pad_id(tok)
    if cfg.task == "classify":
        rows = load_class_rows(cfg.data, tok, max_len, skip_bad=cfg.skip_bad_rows)
        names = rows.names
        if cfg.val_data:
            val_rows = load_class_rows(cfg.val_data, tok, max_len, names=names, skip_bad=cfg.skip_bad_rows)
            train, val = rows.examples, val_rows.examples
        else:
            train, val = sft.split(rows.examples, cfg.val_fraction, cfg.seed)
        return train, val, sft.Collate(pad), names, rows.summary()
    enc = sft.encode_file(cfg.data, tok, cfg.task, max_len, skip_bad=cfg.skip_bad_rows)
    if cfg.val_data:
        train, val = enc.examples, sft.encode_file(cfg.val_data, tok, cfg.task, max_len, cfg.skip_bad_rows).examples
    else:
        train, val = sft.split(enc.examples, cfg.val_fraction, cfg.seed)
    train_rows = sft.to_rows(train, max_len, pack=cfg.pack, seed=cfg.seed)
    val_rows = sft.to_rows(val, max_len) if val else []
    summary = f"{enc.summary()}; {sft.trained_tokens(train_rows):,} trained tokens in {len(train_rows)} rows"
    return train_rows, val_rows, sft.Collate(pad), None, summary


# ---------------------------------------------------------------------------------------------------------
# the run


def finetune(model: str | nn.Module, config: FinetuneConfig, tokenizer=None) -> FinetuneResult:
    """Fine-tune `model` (an HF dir / hub id, or a gptlab GPT with `tokenizer`) as `config` says.

    Writes out_dir/last (resumable), out_dir/best (best validation metric, when there is validation data),
    out_dir/final, and with save_merged out_dir/merged (from best/ when it exists).
    """
    from gptlab.data import ExampleBatches
    from gptlab.hf import load
    from gptlab.lora import apply_lora, unload_lora
    from gptlab.tokenizer import load_tokenizer

    cfg = config
    device = pick_device(cfg.device)
    dist = init_distributed(device)
    t0 = time.perf_counter()
    base_name = model if isinstance(model, str) else getattr(model, "source", None)
    if isinstance(model, str):
        tokenizer = tokenizer or load_tokenizer(model)
        model = load(model, dtype=torch.float32)
    elif tokenizer is None:
        raise GptlabError("pass the tokenizer along with a model object")
    tok = tokenizer
    max_len = min(cfg.max_len or model.config.block_size, model.config.block_size)
    train, val, collate, names, summary = _datasets(cfg, tok, max_len)

    torch.manual_seed(cfg.seed)  # the classifier head's and the adapters' initialisation
    if cfg.task == "classify":
        module: nn.Module = SequenceClassifier(model, len(names), _pad_id(tok))
        model.lm_head.weight.requires_grad_(model.config.tie_embeddings)  # a classifier never reads the LM head
    else:
        module = model
    if cfg.method == "lora":
        apply_lora(model, targets=cfg.lora_targets, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                   rslora=cfg.rslora)
        if cfg.task == "classify":
            module.score.weight.requires_grad_(True)  # the new head trains in full (PEFT's modules_to_save)
        saver = AdapterSaver(tok, base_name, names)
    elif cfg.task == "classify":
        saver = ClassifierSaver(tok, names)
    else:
        saver = None  # the Trainer's default: an HF model dir with the tokenizer (its chat template included)
    module.train()

    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())
    if dist.main and not cfg.quiet:
        print(f"{cfg.task} / {cfg.method}: {summary}; {len(val)} validation examples; "
              f"training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)", flush=True)
    train_batches = ExampleBatches(train, cfg.batch_size, collate, seed=cfg.seed)
    val_batches = ExampleBatches(val, cfg.batch_size, collate, shuffle=False) if val else None
    trainer = Trainer(
        module, train_batches, val_batches, cfg, tokenizer=tok,
        loss_fn=classification_loss if cfg.task == "classify" else next_token_loss,
        metrics_fn=ClassificationMetrics(names) if cfg.task == "classify" and val else None,
        saver=saver, device=device, dist=dist,
    )
    metrics = trainer.fit()
    result = FinetuneResult(unwrap(trainer.model), tok, metrics, Path(cfg.out_dir), names, bool(metrics.get("stopped")))
    if result.stopped:
        return result
    final = trainer.save_checkpoint("final", with_state=False)
    metrics["wall_s"] = time.perf_counter() - t0
    if cfg.method == "lora" and cfg.save_merged and dist.main:
        best = Path(cfg.out_dir) / "best"
        if best.is_dir():
            AdapterSaver(tok, base_name, names).load(result.model, best)
        unload_lora(model, merge=True)
        merged = Path(cfg.out_dir) / "merged"
        if cfg.task == "classify":
            ClassifierSaver(tok, names).save(result.model, merged)
        else:
            model.save(merged, tokenizer=tok)
        metrics["merged"] = str(merged)
    if dist.main and not cfg.quiet:
        shown = {k: v for k, v in metrics.items() if k.startswith("val_") or k in ("accuracy", "macro_f1")}
        print(f"saved {final}" + (f" and {metrics['merged']}" if "merged" in metrics else "")
              + f" ({metrics['wall_s']:.0f} s)"
              + "".join(f", {k} {v:.4f}" for k, v in shown.items() if isinstance(v, float) and k != "val_ppl"),
              flush=True)
    return result


@command("finetune")
def finetune_command(model: str, config: FinetuneConfig) -> int:
    """Fine-tune MODEL on a JSONL file: full or LoRA; instruction SFT, classification or plain LM.

    Writes out_dir/final (LoRA: an adapter dir in PEFT's layout; full: an HF model dir),
    out_dir/best (best validation metric) and out_dir/last (resume with --resume). Examples:

      gptlab finetune gpt2 --data=instructions.jsonl --method=lora --task=sft
      gptlab finetune Qwen/Qwen2.5-0.5B-Instruct recipes/finetune-lora-sft.yaml --data=chat.jsonl
      gptlab finetune gpt2 --data=reviews.jsonl --task=classify --method=full --best-metric=accuracy --maximize

    Args:
        model: the base model: an HF-format model dir or hub id
        config: a FinetuneConfig recipe (YAML) and/or --field=value overrides
    """
    finetune(model, config)
    return 0
