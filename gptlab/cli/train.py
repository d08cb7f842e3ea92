"""`gptlab train` (pretraining, gptlab.train.pretrain) and `gptlab finetune` (gptlab.train.finetune)."""

from __future__ import annotations

from gptlab.cli import command
from gptlab.train.finetune import FinetuneConfig, finetune
from gptlab.train.pretrain import TrainConfig, run_pretraining


@command("train")
def train_command(config: TrainConfig) -> int:
    """Pretrain a model; no arguments: a small GPT on python-docs for 5 minutes.

    Saves out_dir/final, best, last (--resume). All options: docs/training.md.

    Args:
        config: a TrainConfig recipe (YAML) and/or --field=value overrides, e.g. --model.n_layer=6
    """
    run_pretraining(config)
    return 0


@command("finetune")
def finetune_command(model: str, config: FinetuneConfig) -> int:
    """Fine-tune MODEL: full or LoRA; SFT, LM, classification or GPT-1 tasks.

    Writes out_dir/final, best, last (--resume). docs/finetune.md has all options:

      gptlab finetune gpt2 --data=instructions.jsonl --method=lora --task=sft
      gptlab finetune Qwen/Qwen2.5-0.5B-Instruct recipes/finetune-lora-sft.yaml --data=chat.jsonl
      gptlab finetune gpt2 --data=reviews.jsonl --task=classification --method=full --best-metric=accuracy --maximize

    Args:
        model: the base model: an HF model dir or hub id
        config: a FinetuneConfig recipe (YAML) and/or --field=value overrides
    """
    finetune(model, config)
    return 0
