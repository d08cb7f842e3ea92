"""Checkpoint formats for the training loop's `saver` hook: `.save(model, dir)` and `.load(model, dir)`.

    HFSaver          a full Hugging Face model dir (the default): gptlab generate and transformers open it
    AdapterSaver     only the LoRA adapter (and a classifier's head), in PEFT's layout
    ClassifierSaver  a full classifier dir that AutoModelForSequenceClassification opens
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from gptlab.errors import GptlabError
from gptlab.formats import hf, peft
from gptlab.models.classifier import SequenceClassifier
from gptlab.train.runtime import unwrap


class HFSaver:
    """The default checkpoint format: a full Hugging Face model dir (config.json + model.safetensors + tokenizer)."""

    def __init__(self, tokenizer=None) -> None:
        self.tokenizer = tokenizer

    def save(self, model: nn.Module, path: Path) -> None:
        hf.save(unwrap(model), path, tokenizer=self.tokenizer)

    def load(self, model: nn.Module, path: Path) -> None:
        module = unwrap(model)
        p = next(module.parameters())
        loaded = hf.load(path, dtype=p.dtype, device=p.device)
        diff = [k for k in ("model_type", *loaded.config.architecture_diff(module.config))
                if getattr(loaded.config, k) != getattr(module.config, k)]
        if diff:
            shown = ", ".join(f"{k}={getattr(loaded.config, k)!r} (run: {getattr(module.config, k)!r})" for k in diff)
            raise GptlabError(f"checkpoint {path} does not match this run's model: {shown}")
        with torch.no_grad():
            module.load_state_dict(loaded.state_dict(), strict=True)


def _gpt(model: nn.Module) -> nn.Module:
    return model.model if isinstance(model, SequenceClassifier) else model


class AdapterSaver:
    """LoRA checkpoints: only the adapter (and a classifier's head), in PEFT's layout."""

    def __init__(self, tokenizer, base_model: str | None, labels: list[str] | None = None) -> None:
        self.tokenizer, self.base_model, self.labels = tokenizer, base_model, labels

    def save(self, model: nn.Module, path: Path) -> None:
        extra, task_type = None, "CAUSAL_LM"
        if isinstance(model, SequenceClassifier):
            extra, _ = hf.classifier_extras(model, self.labels)
            task_type = "SEQ_CLS"
        peft.save_adapter(_gpt(model), path, base_model=self.base_model, task_type=task_type, extra_tensors=extra,
                          tokenizer=self.tokenizer)

    def load(self, model: nn.Module, path: Path) -> None:
        extras = peft.load_adapter_weights(_gpt(model), path)
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
        hf.save_classifier(model, path, self.labels, tokenizer=self.tokenizer)

    def load(self, model: nn.Module, path: Path) -> None:
        p = next(model.parameters())
        loaded, _ = hf.load_classifier(path, dtype=p.dtype, device=p.device)
        with torch.no_grad():
            model.load_state_dict(loaded.state_dict(), strict=True)


# ---- the trainer's own state files (trainer/ in a checkpoint) ----
def load_state_file(path: Path, device: torch.device):
    """torch.load(weights_only=True) of a trainer state file, with one clear error naming it when it is missing,
    truncated or not such a file."""
    if not path.is_file():
        raise GptlabError(f"{path} is missing; the checkpoint is incomplete")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises RuntimeError / UnpicklingError / EOFError for damaged files
        raise GptlabError(f"{path} cannot be read ({type(e).__name__}): truncated or damaged; resume from "
                          f"another checkpoint or start over with --overwrite") from None


def load_optimizer(optimizer: torch.optim.Optimizer, path: Path, device: torch.device) -> None:
    # weights_only=True: optimizer state and RNG are plain tensors and numbers, never pickled objects
    try:
        optimizer.load_state_dict(load_state_file(path, device))
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise GptlabError(f"{path} does not fit this run's optimizer: {e}") from None


def restore_rng(path: Path, device: torch.device) -> None:
    """Put back a process's generator states (its dropout stream), saved as rng-<rank>.pt."""
    rng = load_state_file(path, torch.device("cpu"))
    if not isinstance(rng, dict) or not isinstance(rng.get("cpu"), torch.Tensor):
        raise GptlabError(f"{path} holds no CPU generator state; the checkpoint is damaged")
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)
