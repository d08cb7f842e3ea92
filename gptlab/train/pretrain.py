"""Pretraining, the recipe behind `gptlab train`: prepare the corpus (cached), build the model, run the
Trainer, save final/, print a sample.

    from gptlab.train.pretrain import TrainConfig, run_pretraining
    result = run_pretraining(TrainConfig(data="python-docs", max_steps=750))
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn as nn

from gptlab.data.shards import TokenWindows, ensure_prepared, read_manifest
from gptlab.errors import GptlabError
from gptlab.formats import hf
from gptlab.infer.generate import generate
from gptlab.models import stats
from gptlab.models.config import Config
from gptlab.models.model import GPT
from gptlab.tokenizer import load_tokenizer
from gptlab.train.budget import UNSET
from gptlab.train.loop import LoopConfig, Trainer
from gptlab.train.runtime import init_distributed, pick_device, unwrap


@dataclass
class PretrainModel(Config):
    """A Config whose defaults are the model `gptlab train` builds: GPT-2 layout, sized for ~5 minutes on 2 CPU
    cores. Being its own class, a recipe's `model:` section (or --model.n_layer=6) changes only what it names
    and keeps these defaults for the rest.

    1.3M parameters (half of them the 4096 x 128 tied embedding). The run has a 5-minute time budget (no
    --max-steps), so it takes as many steps of 16 x 128 tokens as the machine allows: ~700 with Muon on 2 AVX2
    cores. At such budgets small models and many small steps win: 6 x 192 and context 256 x batch 8 both
    reached a worse val bpb in 4 minutes (docs/training.md, "The speedrun recipe"); so did batch 32 x 400
    steps against 16 x 800.
    """

    GROUP: ClassVar[str] = "model (every Config field as --model.FIELD; docs/models.md lists them)"
    LISTED: ClassVar[tuple[str, ...]] = ("model_type", "n_layer", "n_head", "n_embd", "context_length", "dropout")
    SET_ELSEWHERE: ClassVar[dict[str, str]] = {
        "name": "a trained model is named by its directory", "hf_repo": "it names a published checkpoint",
        "vocab_size": "it comes from the data's tokenizer", "bos_token_id": "it comes from the data's tokenizer",
        "eos_token_id": "it comes from the data's tokenizer", "pad_token_id": "pretraining windows have no padding",
    }

    name: str = "gptlab-python-docs"
    model_type: str = "gpt2"  # HF family: gpt2, gpt_neox, qwen3, ...
    vocab_size: int = 4096  # replaced by the data's vocabulary
    context_length: int = 128  # tokens the model attends over
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads
    n_embd: int = 128  # width


@dataclass
class TrainConfig(LoopConfig):
    """A pretraining recipe: data, model and the loop settings of LoopConfig."""

    GROUP: ClassVar[str] = "data and run"

    data: str = "python-docs"  # data dir, or a corpus to prepare
    tokenizer: str | None = None  # tokenizer for a corpus (default: train one)
    vocab_size: int = 4096  # vocabulary of a tokenizer trained here
    data_cache: str = "out/data"  # where prepared corpora are cached
    val_fraction: float = 0.02  # validation share of a corpus
    preset: str | None = None  # start from a named preset (gptlab models)
    init_from: str | None = None  # start from this model dir's weights
    model: PretrainModel = field(default_factory=PretrainModel)
    seq_len: int = 0  # tokens per sequence (0 = context length)
    sample_prompt: str = "The with statement"  # sample prompt ('' = none)
    sample_tokens: int = 120  # tokens in the closing sample
    max_flops: float = 0.0  # FLOPs budget; sets max_steps (0 = off)
    out_dir: str = "out/python-docs"
    max_steps: int = 0  # optimizer steps (0 = set by the time budget)
    batch_size: int = 16
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 30
    eval_every: int = 150
    optimizer: Literal["adamw", "muon"] = "muon"

DEFAULT_BUDGET = "5m"  # the training time of a run given neither --max-steps, --time-budget nor --max-flops


def _model_config(cfg: TrainConfig, vocab_size: int) -> Config:
    if cfg.preset:
        m = cfg.model
        defaults = dataclasses.asdict(PretrainModel())
        # fields __post_init__ derived from the small default's sizes are not choices of the user
        derived = {"n_kv_head": m.n_head, "head_dim": m.n_embd // m.n_head, "intermediate_size": 4 * m.n_embd}
        chosen = {k: v for k, v in dataclasses.asdict(m).items()
                  if k != "name" and v != defaults[k] and not (k in derived and v == derived[k])}
        model_cfg = Config.from_name(cfg.preset, **chosen)
    else:
        model_cfg = cfg.model
    return model_cfg.replace(vocab_size=vocab_size)


def build_model(cfg: TrainConfig, vocab_size: int, eos_id: int | None) -> GPT:
    if cfg.init_from:
        model = hf.load(cfg.init_from, dtype=torch.float32)
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
    if not cfg.max_steps:  # no step count: a time budget decides (five minutes unless given), or --max-flops
        budget = cfg.time_budget or ("" if cfg.max_flops else DEFAULT_BUDGET)
        cfg = dataclasses.replace(cfg, max_steps=UNSET, time_budget=budget)
    device = pick_device(cfg.device)
    dist = init_distributed(device)
    t0 = time.perf_counter()
    data_dir = ensure_prepared(cfg.data, tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size, cache=cfg.data_cache,
                               val_fraction=cfg.val_fraction, quiet=cfg.quiet or not dist.main,
                               is_main=dist.main, barrier=dist.barrier)
    manifest = read_manifest(data_dir)
    tok = load_tokenizer(data_dir / manifest["tokenizer"])
    model = build_model(cfg, manifest["vocab_size"], tok.eos_id)
    seq_len = cfg.seq_len or model.config.context_length
    if seq_len > model.config.context_length:
        raise GptlabError(f"seq_len={seq_len} exceeds the model's context_length={model.config.context_length}")
    train = TokenWindows(data_dir, "train", seq_len, cfg.batch_size, seed=cfg.seed)
    val = TokenWindows(data_dir, "val", seq_len, cfg.batch_size, seed=cfg.seed, shuffle=False)
    if dist.main and not cfg.quiet:
        n = sum(p.numel() for p in model.parameters())
        print(f"data {data_dir}: {manifest['splits']['train']['tokens']:,} train / "
              f"{manifest['splits']['val']['tokens']:,} val tokens; model {n / 1e6:.2f}M parameters "
              f"({model.config.n_layer} layers, {model.config.n_embd} wide, context {seq_len})", flush=True)
    fpt = stats.flops_per_token(model.config, seq_len, training=True)
    budget = None
    if cfg.max_flops and cfg.time_budget:
        raise GptlabError("--max-flops and --time-budget both set the number of steps; choose one")
    if cfg.max_flops:
        cfg, budget = _budgeted(cfg, fpt, seq_len * cfg.batch_size * cfg.grad_accum * dist.world, dist.main)
    trainer = Trainer(model, train, val, cfg, tokenizer=tok, device=device, dist=dist,
                      bytes_per_token=manifest["splits"]["val"]["bytes"] / manifest["splits"]["val"]["tokens"],
                      flops_per_token=fpt, find_unused_parameters=model.config.mlp == "moe")
    result = trainer.fit()
    counts = stats.count_params(model.config)
    result.update(params=counts["non_embedding"] + counts["head"], params_total=counts["total"],
                  tokens=trainer.step * seq_len * cfg.batch_size * cfg.grad_accum * dist.world,
                  flops_per_token=fpt)
    result["flops"] = result["tokens"] * fpt
    if budget is not None:
        result["budget"] = budget
    if result.get("stopped"):
        trainer.release()
        return result
    final = trainer.save_checkpoint("final", with_state=False)
    trainer.release()
    result["wall_s"] = time.perf_counter() - t0
    if dist.main and not cfg.quiet:
        bpb = result.get("val_bpb")
        print(f"saved {final} ({result['wall_s']:.0f} s"
              + (f", val bits per byte {bpb:.3f}" if bpb is not None else "") + ")", flush=True)
        if cfg.sample_prompt and cfg.sample_tokens > 0:
            sampler = unwrap(model) if trainer.fsdp_template is None else hf.load(final)  # --fsdp: rank 0 has a shard
            print_sample(sampler, tok, cfg.sample_prompt, cfg.sample_tokens, cfg.seed)
    return result


def _budgeted(cfg: TrainConfig, flops_per_token: float, tokens_per_step: int, main: bool):
    """A run stopped by a compute budget: as many whole steps as max_flops buys, the schedule that long.
    FLOPs are stats.flops_per_token(training=True): 6 x (non-embedding parameters + head) plus attention."""
    from gptlab.limits import Limit, check

    check("max_flops", cfg.max_flops, Limit(float, 0, low_open=True))
    steps = int(cfg.max_flops // (flops_per_token * tokens_per_step))
    if steps < 1:
        raise GptlabError(f"max-flops {cfg.max_flops:.3g} buys no step of this model ({flops_per_token * tokens_per_step:.3g} "
                          f"FLOPs per step of {tokens_per_step:,} tokens); raise it or shrink the model")
    warmup = min(cfg.warmup_steps, steps // 5)
    if main and not cfg.quiet:
        print(f"budget {cfg.max_flops:.3g} FLOPs = {steps:,} steps of {tokens_per_step:,} tokens at "
              f"{flops_per_token:.3g} FLOPs per token" + (f"; warm-up {warmup} steps" if warmup != cfg.warmup_steps
                                                             else ""), flush=True)
    return dataclasses.replace(cfg, max_steps=steps, warmup_steps=warmup), cfg.max_flops


def print_sample(model: nn.Module, tok, prompt: str, n_tokens: int, seed: int) -> None:
    """The closing sample; a prompt + n_tokens past the context is shortened to fit (and says so), not an
    error after the training is done."""
    model.eval()
    room = model.config.context_length - max(1, len(tok.encode(prompt)))
    if room < 1:
        print(f"(no sample: the prompt fills the model's context of {model.config.context_length} tokens)")
        return
    if n_tokens > room:
        print(f"(sample shortened to {room} tokens to fit the model's context of {model.config.context_length})")
        n_tokens = room
    text = generate(model, tok, prompt, max_new_tokens=n_tokens, temperature=0.8, top_k=50, seed=seed)
    print(f"--- sample ---\n{prompt}{text}\n--------------", flush=True)
