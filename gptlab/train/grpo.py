"""GRPO (Shao et al. 2024, DeepSeekMath) with verifiable rewards on the one loop: `--task grpo`.

Each optimizer step reads prompts, samples `num_generations` completions per prompt from the current model
on the batched engine (a per-prompt seed, so a resumed run and any split into micro-batches sample the same),
scores them with the rewards (gptlab/eval/rewards.py: a weighted sum, None adding nothing), and trains on

    advantage  A = (r - mean_group(r)) / (std(r) + 1e-4)   std Bessel-corrected over the group (scale_rewards
               group), over the micro-batch (batch), or no division (none)
    ratio      rho = exp(log pi - log pi_old); with one update per rollout pi_old = pi (TRL's default), so rho = 1
               in value while its gradient is the policy gradient
    per token  -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + kl_beta k3,  k3 = exp(ref - logp) - (ref - logp) - 1
    grpo       each completion's mean over its tokens, averaged over completions
    dr_grpo    the token sum over (completions x max_new_tokens)           (Liu et al. 2025, "Dr. GRPO")
    dapo       the token sum over all completion tokens                     (Yu et al. 2025, DAPO)

exactly TRL's GRPOTrainer definitions (tested equal to its loss). kl_beta 0 (the default) keeps no
reference; otherwise the reference is the starting model (LoRA switched off, or a frozen copy).
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab.data.examples import render_prompt
from gptlab.data.jsonl import read_jsonl
from gptlab.errors import GptlabError
from gptlab.eval.rewards import load_reward, score
from gptlab.train.preference import StartingModel
from gptlab.train.runtime import unwrap

AGGREGATIONS = ("grpo", "dr_grpo", "dapo")


def group_advantages(rewards: torch.Tensor, group: int, scale: str = "group") -> torch.Tensor:
    """(r - group mean) / (std + 1e-4) for rewards laid out group by group, shape (N,)."""
    grouped = rewards.view(-1, group)
    centred = (grouped - grouped.mean(1, keepdim=True)).flatten()
    if scale == "none":
        return centred
    if scale == "group":
        std = grouped.std(1).repeat_interleave(group) if group > 1 else torch.zeros_like(rewards)
    elif scale == "batch":
        std = rewards.std().expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:
        raise GptlabError(f"--scale-rewards must be group, batch or none, got {scale!r}")
    return centred / (std + 1e-4)


def k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref) per token: exp(ref - logp) - (ref - logp) - 1 >= 0."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def grpo_token_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, eps_low: float = 0.2,
                    eps_high: float = 0.2, kl_beta: float = 0.0, ref_logps: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token loss, clipped flags), each (N, T); advantages (N,)."""
    ratio = torch.exp(logps - old_logps)
    a = advantages.unsqueeze(1)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    loss = -torch.min(ratio * a, clipped * a)
    if kl_beta:
        loss = loss + kl_beta * k3(logps, ref_logps)
    hit = ((ratio < 1 - eps_low) & (a < 0)) | ((ratio > 1 + eps_high) & (a > 0))
    return loss, hit


def aggregate(token_loss: torch.Tensor, mask: torch.Tensor, how: str, max_new_tokens: int) -> tuple[torch.Tensor, Any]:
    """(summed loss, count) for the Trainer, so that sum / count over the whole step is TRL's loss."""
    m = mask.to(token_loss.dtype)
    if how == "grpo":
        return ((token_loss * m).sum(1) / m.sum(1).clamp(min=1)).sum(), token_loss.shape[0]
    if how == "dr_grpo":
        return (token_loss * m).sum() / max_new_tokens, token_loss.shape[0]
    if how == "dapo":
        return (token_loss * m).sum(), m.sum()
    raise GptlabError(f"--loss for grpo must be one of {', '.join(AGGREGATIONS)}, got {how!r}")


def token_logps(model: nn.Module, ids: torch.Tensor, starts: torch.Tensor, width: int) -> torch.Tensor:
    """log pi of the completion tokens: ids (N, L) are prompt + completion + right padding (no attention mask
    needed), completion i starts at starts[i] -> (N, width), aligned to the completions' first token."""
    logits = model(ids[:, :-1])  # (N, L - 1, V)
    logits = logits if logits.dtype == torch.float64 else logits.float()
    full = -F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (N, L - 1)
    pos = (starts.unsqueeze(1) - 1 + torch.arange(width, device=ids.device)).clamp(max=full.shape[1] - 1)
    return full.gather(1, pos)


# ---------------------------------------------------------------------------------------------------------
# prompts


class PromptBatches:
    """Numbered batches of prompt rows (the loop's BatchSource): {"input_ids": padded prompts, "rows": row ids,
    "seeds": one sampling seed per prompt, from its position in the seeded epoch order}."""

    def __init__(self, prompts: list[list[int]], batch_size: int, pad_id: int, seed: int, group: int,
                 shuffle: bool = True) -> None:
        self.prompts, self.batch_size, self.pad_id, self.seed, self.group = prompts, batch_size, pad_id, seed, group
        self.shuffle = shuffle

    def __len__(self) -> int:
        return max(1, math.ceil(len(self.prompts) / self.batch_size))

    def batch(self, index: int, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
        n = len(self.prompts)
        start = (index * world + rank) * self.batch_size
        rows, seeds = [], []
        for pos in range(start, start + self.batch_size):
            epoch, k = divmod(pos, n)
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            rows.append(int(order[k]))
            seeds.append(self.seed * 1_000_003 + pos * self.group)
        T = max(len(self.prompts[r]) for r in rows)
        x = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            x[i, : len(self.prompts[r])] = torch.tensor(self.prompts[r])
        return {"input_ids": x, "rows": torch.tensor(rows), "seeds": torch.tensor(seeds)}


def read_prompts(path: str, tokenizer) -> tuple[list[dict], list[list[int]]]:
    """Rows with `prompt` (text, or chat messages through the template) and their prompt token ids."""
    rows, ids = [], []
    for n, row in read_jsonl(path):
        if "prompt" not in row:
            raise GptlabError(f"{path}:{n}: no 'prompt' field (GRPO rows need a prompt; other fields go to the rewards)")
        ids.append(tokenizer.encode(render_prompt(tokenizer, row["prompt"], f"{path}:{n}")))
        rows.append(row)
    if not rows:
        raise GptlabError(f"{path}: no prompts")
    return rows, ids


# ---------------------------------------------------------------------------------------------------------
# the loss hook: rollouts, rewards, the loss


class GRPOLoss:
    """The Trainer's loss_fn for GRPO: generates, scores and returns (summed loss, count, {logged sums})."""

    def __init__(self, model: nn.Module, tokenizer, rows: list[dict], prompts: list[list[int]], rewards: list[str],
                 weights: list[float] | None = None, num_generations: int = 8, max_new_tokens: int = 64,
                 temperature: float = 1.0, scale_rewards: str = "group", epsilon: float = 0.2,
                 epsilon_high: float | None = None, kl_beta: float = 0.0, loss: str = "grpo") -> None:
        if loss not in AGGREGATIONS:
            raise GptlabError(f"--loss for grpo must be one of {', '.join(AGGREGATIONS)}, got {loss!r}")
        if num_generations < 2:
            raise GptlabError("--num-generations must be >= 2: advantages compare completions of the same prompt")
        if weights and len(weights) != len(rewards):
            raise GptlabError(f"{len(weights)} --reward-weights for {len(rewards)} rewards")
        group_advantages(torch.zeros(2), 2, scale_rewards)  # an unknown scale_rewards fails now, not at step 1
        self.tok, self.rows, self.prompts = tokenizer, rows, prompts
        self.rewards = [load_reward(r) for r in rewards]
        self.weights = list(weights or [1.0] * len(rewards))
        self.G, self.max_new_tokens, self.temperature = num_generations, max_new_tokens, temperature
        self.scale, self.eps_low = scale_rewards, epsilon
        self.eps_high = epsilon if epsilon_high is None else epsilon_high
        self.kl_beta, self.loss = kl_beta, loss
        for module in model.modules():  # the update must score what the engine sampled: no dropout (TRL's advice)
            if isinstance(module, nn.Dropout):
                module.p = 0.0
            elif isinstance(getattr(module, "dropout", None), float):
                module.dropout = 0.0  # attention's dropout_p
        self.reference = StartingModel(model) if kl_beta else None  # no reference kept without a KL term

    @torch.no_grad()
    def rollout(self, model: nn.Module, rows: list[int], seeds: list[int]):
        from gptlab.infer.generate import engine_for
        from gptlab.infer.sampling import Sampling

        m = unwrap(model)
        was_training = m.training
        m.eval()
        samplings = [Sampling(max_new_tokens=self.max_new_tokens, temperature=self.temperature, n=self.G, seed=s)
                     for s in seeds]
        prompts = [self.prompts[r] for r in rows]
        outs = engine_for(m, self.tok, [len(p) for p in prompts], samplings[0]).generate(prompts, samplings)
        m.train(was_training)
        eos = self.tok.eos_id
        completions = []
        for o in outs:
            completions += [c.sampled_ids(eos) for c in o.outputs]
        texts = [c.text for o in outs for c in o.outputs]
        return prompts, completions, texts

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        device = batch["input_ids"].device
        rows, seeds = batch["rows"].tolist(), batch["seeds"].tolist()
        t0 = time.perf_counter()
        prompts, completions, texts = self.rollout(model, rows, seeds)
        t_gen = time.perf_counter() - t0
        flat = [self.rows[r] for r in rows for _ in range(self.G)]
        per_fn = []
        for (name, fn), w in zip(self.rewards, self.weights):
            values = score(name, fn, [row["prompt"] for row in flat], texts, flat)
            per_fn.append(torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float32))
        stacked = torch.stack(per_fn)  # (functions, N)
        weights = torch.tensor(self.weights).unsqueeze(1)
        total = torch.nansum(stacked * weights, 0)  # None adds nothing (TRL's nansum)
        adv = group_advantages(total, self.G, self.scale).to(device)

        # prompt + completion per row, right-padded: each row computes exactly what the engine sampled from
        T = max(1, max(len(c) for c in completions))
        L = max(len(prompts[i // self.G]) + len(c) for i, c in enumerate(completions))
        pad = self.tok.pad_id if self.tok.pad_id is not None else (self.tok.eos_id or 0)
        ids = torch.full((len(completions), max(L, 2)), pad, dtype=torch.long)
        mask = torch.zeros((len(completions), T), dtype=torch.bool)
        starts = torch.zeros(len(completions), dtype=torch.long)
        for i, c in enumerate(completions):
            p = prompts[i // self.G]
            ids[i, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
            mask[i, : len(c)] = True
            starts[i] = len(p)
        ids, mask, starts = ids.to(device), mask.to(device), starts.to(device)
        t1 = time.perf_counter()
        logps = token_logps(model, ids, starts, T)
        ref = self.reference(token_logps, model, ids, starts, T) if self.reference is not None else None
        token_loss, clipped = grpo_token_loss(logps, logps.detach(), adv, self.eps_low, self.eps_high, self.kl_beta, ref)
        loss, count = aggregate(token_loss, mask, self.loss, self.max_new_tokens)
        n = len(completions)
        scale = float(count) / n if not isinstance(count, int) else 1.0  # logged values are per completion
        m = mask.float()
        extras = {f"reward/{name}": torch.nan_to_num(v).sum() * scale for (name, _), v in zip(self.rewards, per_fn)}
        for (name, _), v in zip(self.rewards, per_fn):  # each function's spread over the micro-batch's completions
            known = v[~v.isnan()]
            extras[f"reward/{name}/std"] = (known.std() if len(known) > 1 else torch.tensor(0.0)) * n * scale
        extras.update({
            "reward": total.sum() * scale, "reward_std": total.view(-1, self.G).std(1).sum() * self.G * scale,
            "completion_length": m.sum() * scale, "clip_fraction": ((clipped & mask).float().sum(1) /
                                                                     m.sum(1).clamp(min=1)).sum() * scale,
            "generation_s": torch.tensor(t_gen * n * scale)})
        if ref is not None:
            extras["kl"] = ((k3(logps, ref) * m).sum(1) / m.sum(1).clamp(min=1)).detach().sum() * scale
        extras["update_s"] = torch.tensor((time.perf_counter() - t1) * n * scale)
        return loss, count, {k: v.detach().float().cpu() if torch.is_tensor(v) else v for k, v in extras.items()}
