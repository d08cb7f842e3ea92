"""Fine-tuning, the recipe behind `gptlab finetune`: full or LoRA, for instruction SFT, sequence
classification or plain language modelling.

Every combination runs on the one training loop (`gptlab.train.loop.Trainer`); a method only chooses what
plugs in:

    method  which parameters train        what a checkpoint holds (saver)
    full    all of them                   an HF model dir (+ the classifier's score.weight)
    lora    the adapters (+ score head)    a PEFT adapter dir (adapter_config.json + adapter_model.safetensors)

    task      data rows                           loss (loss_fn)                        extra eval metrics
    sft       chat / instruction / prompt rows   next-token CE on assistant tokens      -
    lm        {"text"}                            next-token CE on every token           -
    classification  {"text", "label"}             CE of the score head, last token        accuracy, P/R/F1
                    ("classify" is accepted for it)
    entailment / similarity / choice: GPT-1's input transformations (gptlab/data/gpt1_tasks.py): the head on
                    the extract token, + lm_loss_weight x the LM loss on the same sequences; accuracy, P/R/F1

So resume (--resume), early stopping (--patience) with out_dir/best, data-parallel runs under torchrun
and the logs are those of pretraining. Python:

    from gptlab.train.finetune import FinetuneConfig, finetune
    result = finetune("path/to/model", FinetuneConfig(data="train.jsonl", method="lora", task="sft"))
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn as nn

from gptlab.data import examples
from gptlab.data.examples import ExampleBatches, load_class_rows
from gptlab.data.gpt1_tasks import GPT1_TASKS, TOKENS, GroupCollate, TaskTokens, load_task_rows, task_tokens
from gptlab.errors import GptlabError
from gptlab.limits import Limit, check, check_fields
from gptlab.eval.metrics import classification_report
from gptlab.train.distill import DistillLoss, OnPolicyBatches, check_compatible
from gptlab.train.grpo import GRPOLoss, PromptBatches, read_prompts
from gptlab.train.preference import DPOLoss, PairCollate, precompute_reference, read_pairs
from gptlab.formats import hf
from gptlab.models import stats
from gptlab.models.classifier import SequenceClassifier, TaskClassifier
from gptlab.formats.peft import apply_lora
from gptlab.models.lora import unload_lora
from gptlab.tokenizer import load_tokenizer
from gptlab.train.loop import LoopConfig, Trainer
from gptlab.train.losses import classification_loss, gpt1_task_loss, next_token_loss
from gptlab.train.runtime import init_distributed, pick_device, unwrap
from gptlab.train.savers import AdapterSaver, ClassifierSaver

Method = Literal["full", "lora"]
Task = Literal["sft", "classification", "lm", "entailment", "similarity", "choice", "dpo", "grpo", "distill"]


@dataclass
class FinetuneConfig(LoopConfig):
    """A fine-tuning recipe: data, method, task and the loop settings of LoopConfig."""

    GROUP: ClassVar[str] = "data, method and task"
    RENAMED: ClassVar[dict[str, str]] = {"max_len": "seq_len"}  # earlier option names, still read
    ALIASES: ClassVar[dict[str, dict[str, str]]] = {"task": {"classify": "classification"}}  # other values read
    RESUME_SAME: ClassVar[tuple[str, ...]] = ("method", "task", "lora_targets", "lora_r")  # last/ is laid out by them

    data: str = ""  # training JSONL (row shapes: docs/finetune.md)
    val_data: str = ""  # validation JSONL ("" = hold out val_fraction)
    val_fraction: float = 0.1  # share of data held out (0 = none)
    method: Method = "lora"  # full or lora
    task: Task = "sft"  # rows
    lora_targets: list[str] = field(default_factory=lambda: ["qkv"])  # HF or gptlab module names, or all-linear
    lora_r: int = 8  # adapter rank
    lora_alpha: float = 16.0  # adapter scale is lora_alpha / lora_r
    lora_dropout: float = 0.0  # dropout on the adapters' input
    rslora: bool = False  # scale by lora_alpha / sqrt(lora_r)
    seq_len: int = 512  # tokens per example (0 = context length)
    pack: bool = False  # pack short examples into seq_len rows
    skip_bad_rows: bool = False  # count and skip malformed rows
    lm_loss_weight: float = 0.5  # GPT-1 tasks: auxiliary LM loss weight
    loss: str = ""  # dpo: sigmoid, ipo, hinge, robust; grpo: grpo, dr_grpo, dapo
    beta: float = 0.1  # dpo: weight of the log-ratios
    label_smoothing: float = 0.0  # dpo robust: assumed share of flipped pairs
    precompute_ref: bool = False  # dpo: reference log-probs in one pass first
    teacher: str = ""  # distill: the teacher model dir
    jsd_beta: float = 0.5  # distill: 0 = forward KL, 1 = reverse KL
    temperature: float = 1.0  # distill: softmax temperature; grpo: sampling's
    on_policy: float = 0.0  # distill: share of steps on own samples
    reward: list[str] = field(default_factory=lambda: ["numeric"])  # grpo: numeric, exact, format, module:fn
    reward_weights: list[float] = field(default_factory=list)  # grpo: one per reward (default 1 each)
    num_generations: int = 8  # grpo: completions per prompt
    max_new_tokens: int = 64  # grpo: tokens per completion
    scale_rewards: str = "group"  # grpo: advantages / std over group, batch or none
    epsilon: float = 0.2  # grpo: clip range
    epsilon_high: float = 0.0  # grpo: upper clip range (0 = epsilon)
    kl_beta: float = 0.0  # grpo: k3 KL penalty to the start (0 = no reference)
    save_merged: bool = False  # lora: also write out_dir/merged
    out_dir: str = "out/finetune"
    max_steps: int = 300
    lr: float = 2e-4
    min_lr: float = 2e-5
    warmup_steps: int = 20
    weight_decay: float = 0.0
    beta2: float = 0.999
    eval_every: int = 50

    def __post_init__(self) -> None:
        self.task = self.ALIASES["task"].get(self.task, self.task)
        check_fields(self, ("val_fraction", "seq_len", "lora_r", "lora_alpha", "lora_dropout", "lm_loss_weight", "beta",
                            "label_smoothing", "jsd_beta", "on_policy"))
        check("temperature", self.temperature, Limit(float, 0, low_open=True))
        for name in ("num_generations", "max_new_tokens", "epsilon", "epsilon_high", "kl_beta"):
            check(name, getattr(self, name))


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
        report = classification_report(dist.sum(conf).tolist(), self.names)
        out = {"accuracy": report["accuracy"]}
        for name, c in report["per_class"].items():
            out.update({f"precision/{name}": c["precision"], f"recall/{name}": c["recall"], f"f1/{name}": c["f1"]})
        out["macro_f1"] = report["macro_f1"]
        return out


# ---------------------------------------------------------------------------------------------------------
# data


COMBINE = {"entailment": "one", "similarity": "sum", "choice": "choice"}  # TaskClassifier's ways


def head_names(module: nn.Module, names: list[str]) -> list[str]:
    """The saved head's output names: the class names, or one "score" for multiple choice."""
    return ["score"] if getattr(module, "combine", None) == "choice" else names


def _pad_id(tok) -> int:
    for i in (tok.pad_id, tok.eos_id):
        if i is not None:
            return i
    raise GptlabError("the tokenizer has neither a pad nor an EOS token to pad batches with")


def _datasets(cfg: FinetuneConfig, tok, seq_len: int, tokens: TaskTokens | None = None):
    """(train examples, val examples, collate, class names or None, a summary line)."""
    sft = examples
    if not cfg.data:
        raise GptlabError("no training data: pass --data FILE.jsonl")
    pad = _pad_id(tok)
    if tokens is not None:  # GPT-1's tasks
        rows = load_task_rows(cfg.data, cfg.task, tok, tokens, seq_len, skip_bad=cfg.skip_bad_rows)
        if cfg.val_data:
            val = load_task_rows(cfg.val_data, cfg.task, tok, tokens, seq_len, rows.names, cfg.skip_bad_rows).examples
            train = rows.examples
        else:
            train, val = sft.split(rows.examples, cfg.val_fraction, cfg.seed)
        return train, val, GroupCollate(pad), rows.names, rows.summary()
    if cfg.task == "grpo":
        if cfg.val_data:
            raise GptlabError("--task grpo has no validation loss; drop --val-data (evaluate with gptlab eval)")
        rows, prompts = read_prompts(cfg.data, tok)
        return (rows, prompts), [], None, None, f"{len(rows)} prompts x {cfg.num_generations} completions per step"
    if cfg.task == "dpo":
        train, summary = read_pairs(cfg.data, tok, seq_len, cfg.skip_bad_rows)
        if cfg.val_data:
            val = read_pairs(cfg.val_data, tok, seq_len, cfg.skip_bad_rows)[0]
        else:
            train, val = sft.split(train, cfg.val_fraction, cfg.seed)
        return train, val, PairCollate(pad), None, summary
    if cfg.task == "classification":
        rows = load_class_rows(cfg.data, tok, seq_len, skip_bad=cfg.skip_bad_rows)
        names = rows.names
        if cfg.val_data:
            val_rows = load_class_rows(cfg.val_data, tok, seq_len, names=names, skip_bad=cfg.skip_bad_rows)
            train, val = rows.examples, val_rows.examples
        else:
            train, val = sft.split(rows.examples, cfg.val_fraction, cfg.seed)
        return train, val, sft.Collate(pad), names, rows.summary()
    task = cfg.task if cfg.task != "distill" else _row_task(cfg.data)
    enc = sft.encode_file(cfg.data, tok, task, seq_len, skip_bad=cfg.skip_bad_rows)
    if cfg.val_data:
        train, val = enc.examples, sft.encode_file(cfg.val_data, tok, task, seq_len, cfg.skip_bad_rows).examples
    else:
        train, val = sft.split(enc.examples, cfg.val_fraction, cfg.seed)
    train_rows = sft.to_rows(train, seq_len, pack=cfg.pack, seed=cfg.seed)
    val_rows = sft.to_rows(val, seq_len) if val else []
    summary = f"{enc.summary()}; {sft.trained_tokens(train_rows):,} trained tokens in {len(train_rows)} rows"
    return train_rows, val_rows, sft.Collate(pad), None, summary


def _row_task(path: str) -> str:
    """distill rows: "lm" for {"text"} rows (every token), "sft" for chat / instruction rows (the answers)."""
    from gptlab.data.jsonl import read_jsonl

    for _, row in read_jsonl(path):
        return "lm" if "text" in row and not {"messages", "conversations", "instruction", "prompt"} & set(row) else "sft"
    return "sft"


# ---------------------------------------------------------------------------------------------------------
# the run


def finetune(model: str | nn.Module, config: FinetuneConfig, tokenizer=None) -> FinetuneResult:
    """Fine-tune `model` (an HF dir / hub id, or a gptlab GPT with `tokenizer`) as `config` says.

    Writes out_dir/last (resumable), out_dir/best (best validation metric, when there is validation data),
    out_dir/final, and with save_merged out_dir/merged (from best/ when it exists).
    """
    cfg = config
    if cfg.fsdp and (cfg.method != "full" or cfg.task in ("dpo", "grpo", "distill")):
        raise GptlabError(f"--fsdp shards full fine-tuning (--method full) of the supervised tasks; --method "
                          f"{cfg.method} --task {cfg.task} keeps whole copies of the model (a frozen base, a reference "
                          f"or a generator) that it does not shard: run it with DDP (no --fsdp)")
    device = pick_device(cfg.device)
    dist = init_distributed(device)
    t0 = time.perf_counter()
    base_name = model if isinstance(model, str) else getattr(model, "source", None)
    if isinstance(model, str):
        tokenizer = tokenizer or load_tokenizer(model)
        model = hf.load(model, dtype=torch.float32)
    elif tokenizer is None:
        raise GptlabError("pass the tokenizer along with a model object")
    tok = tokenizer
    seq_len = min(cfg.seq_len or model.config.context_length, model.config.context_length)
    tokens = None
    torch.manual_seed(cfg.seed)  # new token rows', the classifier head's and the adapters' initialisation
    if cfg.task in GPT1_TASKS:
        tokens, added = task_tokens(tok)
        if added and cfg.method == "lora":
            raise GptlabError(f"--task {cfg.task} adds the tokens {', '.join(TOKENS)} to the tokenizer, whose new "
                              "embeddings a LoRA adapter does not train; use --method full, or a tokenizer that has them")
        model.resize_vocab(tok.vocab_size)
    train, val, collate, names, summary = _datasets(cfg, tok, seq_len, tokens)

    if tokens is not None:
        group = len(train[0][0])
        module: nn.Module = TaskClassifier(model, len(names), _pad_id(tok), COMBINE[cfg.task], group)
        model.lm_head.weight.requires_grad_(True)  # the auxiliary LM loss reads the head
    elif cfg.task == "classification":
        module = SequenceClassifier(model, len(names), _pad_id(tok))
        model.lm_head.weight.requires_grad_(model.config.tie_embeddings)  # a classifier never reads the LM head
    else:
        module = model
    if cfg.method == "lora":
        apply_lora(model, targets=cfg.lora_targets, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                   rslora=cfg.rslora)
        if isinstance(module, SequenceClassifier):
            module.score.weight.requires_grad_(True)  # the new head trains in full (PEFT's modules_to_save)
        saver = AdapterSaver(tok, base_name, head_names(module, names))
    elif isinstance(module, SequenceClassifier):
        saver = ClassifierSaver(tok, head_names(module, names))
    else:
        saver = None  # the Trainer's default: an HF model dir with the tokenizer (its chat template included)
    module.train()

    loss_fn = (gpt1_task_loss(cfg.lm_loss_weight) if tokens is not None else
               classification_loss if cfg.task == "classification" else next_token_loss)
    if cfg.task == "dpo":
        if cfg.precompute_ref:
            precompute_reference(model, train + val, _pad_id(tok), cfg.batch_size, progress=not cfg.quiet)
        loss_fn = DPOLoss(model, cfg.beta, cfg.loss or "sigmoid", cfg.label_smoothing, precomputed=cfg.precompute_ref)
    if cfg.task == "grpo":
        rows, prompts = train
        loss_fn = GRPOLoss(model, tok, rows, prompts, cfg.reward, cfg.reward_weights, cfg.num_generations,
                           cfg.max_new_tokens, cfg.temperature, cfg.scale_rewards, cfg.epsilon,
                           cfg.epsilon_high or None, cfg.kl_beta, cfg.loss or "grpo")
        train = prompts
    if cfg.task == "distill":
        if not cfg.teacher:
            raise GptlabError("--task distill needs --teacher DIR (a model of the same tokenizer family)")
        teacher = hf.load(cfg.teacher, dtype=torch.float32)
        check_compatible(tok, load_tokenizer(cfg.teacher), model.config.vocab_size, teacher.config.vocab_size,
                         cfg.teacher)
        loss_fn = DistillLoss(teacher.to(device), cfg.jsd_beta, cfg.temperature, tok, cfg.max_new_tokens)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())
    if dist.main and not cfg.quiet:
        print(f"{cfg.task} / {cfg.method}: {summary}; {len(val)} validation examples; "
              f"training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)", flush=True)
    train_batches = (ExampleBatches(train, cfg.batch_size, collate, seed=cfg.seed) if cfg.task != "grpo" else
                     PromptBatches(train, cfg.batch_size, _pad_id(tok), cfg.seed, cfg.num_generations))
    if cfg.task == "distill" and cfg.on_policy:
        train_batches = OnPolicyBatches(train_batches, cfg.on_policy, cfg.seed)
    val_batches = ExampleBatches(val, cfg.batch_size, collate, shuffle=False) if val else None
    probe = train_batches.batch(0, dist.rank, dist.world)["input_ids"]  # numbered: reading it changes nothing
    trainer = Trainer(
        module, train_batches, val_batches, cfg, tokenizer=tok,
        loss_fn=loss_fn,
        metrics_fn=ClassificationMetrics(names) if names is not None and val else None,
        saver=saver, device=device, dist=dist,
        flops_per_token=stats.flops_per_token(model.config, probe.shape[-1], training=True),
        find_unused_parameters=model.config.mlp == "moe",
    )
    metrics = trainer.fit()
    result = FinetuneResult(unwrap(trainer.model), tok, metrics, Path(cfg.out_dir), names, bool(metrics.get("stopped")))
    if result.stopped:
        trainer.release()
        return result
    final = trainer.save_checkpoint("final", with_state=False)
    trainer.release()
    metrics["wall_s"] = time.perf_counter() - t0
    if cfg.method == "lora" and cfg.save_merged and dist.main:
        best = Path(cfg.out_dir) / "best"
        if best.is_dir():
            AdapterSaver(tok, base_name, names).load(result.model, best)
        unload_lora(model, merge=True)
        merged = Path(cfg.out_dir) / "merged"
        if isinstance(module, SequenceClassifier):
            ClassifierSaver(tok, head_names(module, names)).save(result.model, merged)
        else:
            hf.save(model, merged, tokenizer=tok)
        metrics["merged"] = str(merged)
    if dist.main and not cfg.quiet:
        shown = {k: v for k, v in metrics.items() if k.startswith("val_") or k in ("accuracy", "macro_f1")}
        print(f"saved {final}" + (f" and {metrics['merged']}" if "merged" in metrics else "")
              + f" ({metrics['wall_s']:.0f} s)"
              + "".join(f", {k} {v:.4f}" for k, v in shown.items() if isinstance(v, float) and k != "val_ppl"),
              flush=True)
    return result
