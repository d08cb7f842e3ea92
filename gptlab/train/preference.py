"""Direct preference optimisation (Rafailov et al. 2023) on the one training loop: `--task dpo`.

Rows carry TRL's field names: `prompt`, `chosen`, `rejected`, each text, or chat messages (the prompt a list
of turns, chosen / rejected the assistant turns that follow) rendered with the tokenizer's chat template.
The prompt and each completion are tokenised apart and joined as ids, so the prompt tokens trained on are
exactly those the model sees at inference; a text completion ends with EOS (TRL adds it too).

Losses are small pure functions of summed completion log-probs (`dpo_losses`), with TRL's definitions:

    delta    = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r))
    sigmoid  -log sigmoid(beta delta)                                         (DPO)
    hinge    max(0, 1 - beta delta)                                           (SLiC, Zhao et al. 2023)
    ipo      (delta_per_token - 1 / (2 beta))^2, each log-ratio divided by its completion's token count
             (IPO, Azar et al. 2023, length-normalised as TRL does)
    robust   (-(1 - e) log sigmoid(beta delta) + e log sigmoid(-beta delta)) / (1 - 2e), e = label smoothing
             (Chowdhury et al. 2024)

The reference is the starting model: with LoRA the same weights with the adapters switched off (no second
copy), for full fine-tuning a frozen copy, or with `--precompute-ref` its log-probs computed once before
training (then no reference is kept at all). Logged: rewards/chosen, rewards/rejected (beta x log-ratio),
rewards/margins, rewards/accuracy.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab.data.examples import IGNORE_INDEX, ensure_chat_template, to_messages
from gptlab.data.jsonl import Skipped, read_jsonl, reject
from gptlab.errors import GptlabError
from gptlab.models.lora import lora_disabled, lora_layers
from gptlab.train.runtime import unwrap

LOSSES = ("sigmoid", "ipo", "hinge", "robust")


def dpo_losses(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
               beta: float = 0.1, loss: str = "sigmoid", label_smoothing: float = 0.0,
               chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses, chosen rewards, rejected rewards) from summed completion log-probs, shape (B,) each."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    delta = chosen_ratio - rejected_ratio
    if loss == "sigmoid":
        out = -F.logsigmoid(beta * delta)
    elif loss == "hinge":
        out = torch.relu(1 - beta * delta)
    elif loss == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("ipo needs the completions' token counts")
        per_token = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        out = (per_token - 1 / (2 * beta)) ** 2
    elif loss == "robust":
        e = label_smoothing
        out = (-(1 - e) * F.logsigmoid(beta * delta) + e * F.logsigmoid(-beta * delta)) / (1 - 2 * e)
    else:
        raise GptlabError(f"--loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    return out, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


# ---------------------------------------------------------------------------------------------------------
# rows -> token pairs


@dataclass
class Pair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    ref: tuple[float, float] | None = None  # precomputed reference log-probs (chosen, rejected)


def _completion(row: dict, key: str, where: str) -> str | list:
    value = row.get(key)
    if isinstance(value, str) and value.strip() or isinstance(value, list) and value:
        return value
    if key not in row:
        raise ValueError(f"{where}: no {key!r} field (preference rows need 'prompt', 'chosen' and 'rejected')")
    raise ValueError(f"{where}: {key!r} is empty")


def encode_pair(tokenizer, row: dict[str, Any], where: str) -> Pair:
    """One preference row as token ids; ValueError naming the row when a field is missing or empty."""
    prompt = row.get("prompt")
    if prompt is None:
        raise ValueError(f"{where}: no 'prompt' field (preference rows need 'prompt', 'chosen' and 'rejected'; "
                         "an implicit prompt inside chosen is not read)")
    chosen, rejected = _completion(row, "chosen", where), _completion(row, "rejected", where)
    if isinstance(prompt, list):  # conversational: render through the chat template
        turns = to_messages({"messages": prompt + [{"role": "assistant", "content": ""}]}, where)[:-1]
        head = tokenizer.apply_chat_template(turns, add_generation_prompt=True)
        parts = []
        for c in (chosen, rejected):
            replies = c if isinstance(c, list) else [{"role": "assistant", "content": c}]
            full = tokenizer.apply_chat_template(turns + to_messages({"messages": replies}, where),
                                                 add_generation_prompt=False)
            if not full.startswith(head):
                raise GptlabError("the chat template does not render the prompt as a prefix of prompt + answer")
            ids = tokenizer.encode(full[len(head):])
            if tokenizer.eos_id is not None and tokenizer.eos_id not in ids:
                ids.append(tokenizer.eos_id)
            parts.append(ids)
        return Pair(tokenizer.encode(head), parts[0], parts[1])
    if not isinstance(prompt, str) or not isinstance(chosen, str) or not isinstance(rejected, str):
        raise ValueError(f"{where}: 'prompt', 'chosen' and 'rejected' must all be text, or all chat messages")
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    return Pair(tokenizer.encode(prompt), tokenizer.encode(chosen) + eos, tokenizer.encode(rejected) + eos)


def read_pairs(path, tokenizer, seq_len: int, skip_bad: bool = False) -> tuple[list[Pair], str]:
    """The pairs of a JSONL file, each cut to seq_len + 1 tokens (the completion's end is cut), and a summary."""
    skip = Skipped() if skip_bad else None
    pairs, cut = [], 0
    for n, row in read_jsonl(path, skip):
        where = f"{path}:{n}"
        try:
            if isinstance(row.get("prompt"), list):
                ensure_chat_template(tokenizer)
            p = encode_pair(tokenizer, row, where)
        except ValueError as e:
            reject(skip, str(e))
            continue
        if not p.prompt:
            reject(skip, f"{where}: the prompt is empty (the completions need a prompt to follow)")
            continue
        if len(p.prompt) >= seq_len:
            reject(skip, f"{where}: the prompt alone is {len(p.prompt)} tokens, more than the {seq_len} per example")
            continue
        room = seq_len + 1 - len(p.prompt)
        if len(p.chosen) > room or len(p.rejected) > room:
            cut += 1
            p.chosen, p.rejected = p.chosen[:room], p.rejected[:room]
        pairs.append(p)
    if not pairs:
        raise GptlabError(f"{path}: no preference pairs")
    notes = [f"{len(pairs)} preference pairs"] + ([f"{cut} cut to {seq_len} tokens"] if cut else [])
    return pairs, ", ".join(notes + ([str(skip)] if skip and skip.count else []))


class PairCollate:
    """B pairs -> input_ids (2B, T): the B chosen sequences, then the B rejected; labels on completion tokens
    only; and ref_logps (2B,) when the pairs carry precomputed reference log-probs."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, pairs: list[Pair]) -> dict[str, torch.Tensor]:
        seqs = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
        T = max(len(a) + len(b) for a, b in seqs) - 1
        x = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        y = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)
        for r, (prompt, completion) in enumerate(seqs):
            ids = torch.tensor(prompt + completion, dtype=torch.long)
            x[r, : len(ids) - 1] = ids[:-1]
            y[r, len(prompt) - 1: len(ids) - 1] = ids[len(prompt):]  # the targets that are completion tokens
        out = {"input_ids": x, "labels": y}
        if pairs[0].ref is not None:
            out["ref_logps"] = torch.tensor([p.ref[0] for p in pairs] + [p.ref[1] for p in pairs], dtype=torch.float64)
        return out


# ---------------------------------------------------------------------------------------------------------
# the loss hook


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob of each row's labelled tokens, how many there are), in fp32 (or the model's float64)."""
    logits = model(batch["input_ids"])  # (2B, T, V)
    logits = logits if logits.dtype == torch.float64 else logits.float()
    labels = batch["labels"]
    nll = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    return -nll.view(labels.shape).sum(-1), (labels != IGNORE_INDEX).sum(-1)


class StartingModel:
    """The reference policy: the starting weights, as the same model with its LoRA adapters switched off (no
    copy), or a frozen copy for full fine-tuning (only when `keep`; precomputed log-probs need none)."""

    def __init__(self, model: nn.Module, keep: bool = True) -> None:
        self.copy = copy.deepcopy(model).eval().requires_grad_(False) if keep and not lora_layers(model) else None

    @torch.no_grad()
    def __call__(self, fn, model: nn.Module, *args):
        """fn(the starting model, *args), without gradients."""
        if self.copy is not None:
            return fn(self.copy, *args)
        with lora_disabled():
            return fn(unwrap(model), *args)


class DPOLoss:
    """The Trainer's loss_fn for DPO: (summed pair losses, pairs, {summed rewards and accuracy})."""

    def __init__(self, model: nn.Module, beta: float = 0.1, loss: str = "sigmoid", label_smoothing: float = 0.0,
                 precomputed: bool = False) -> None:
        if loss not in LOSSES:
            raise GptlabError(f"--loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        self.beta, self.loss, self.label_smoothing = beta, loss, label_smoothing
        self.reference = StartingModel(model, keep=not precomputed)

    def reference_logps(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "ref_logps" in batch:
            return batch["ref_logps"]
        return self.reference(lambda m, b: sequence_logps(m, b)[0], model, batch)

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        logps, counts = sequence_logps(model, batch)
        ref = self.reference_logps(model, batch)
        (c, r), (rc, rr), (nc, nr) = logps.chunk(2), ref.chunk(2), counts.chunk(2)
        losses, cr, rj = dpo_losses(c, r, rc, rr, self.beta, self.loss, self.label_smoothing, nc, nr)
        extras = {"rewards/chosen": cr.sum(), "rewards/rejected": rj.sum(), "rewards/margins": (cr - rj).sum(),
                  "rewards/accuracy": (cr > rj).float().sum()}
        return losses.sum(), len(c), extras


@torch.no_grad()
def precompute_reference(model: nn.Module, pairs: list[Pair], pad_id: int, batch_size: int = 8,
                         progress: bool = True) -> None:
    """Fill each pair's `ref` with the starting model's log-probs, in one pass (adapters off)."""
    from tqdm.auto import tqdm

    collate = PairCollate(pad_id)
    was_training = model.training
    model.eval()
    with lora_disabled():
        for s in tqdm(range(0, len(pairs), batch_size), desc="reference log-probs", disable=not progress, leave=False):
            chunk = pairs[s: s + batch_size]
            logps = sequence_logps(model, collate(chunk))[0].tolist()
            for i, p in enumerate(chunk):
                p.ref = (logps[i], logps[len(chunk) + i])
    model.train(was_training)
