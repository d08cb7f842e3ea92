"""Logit distillation from a teacher (`--task distill --teacher DIR`): the generalised Jensen-Shannon
divergence of Agarwal et al. 2024 ("On-policy distillation of language models", GKD), as TRL's GKDTrainer
defines it, per trained token:

    p = softmax(teacher / T), q = softmax(student / T), m = beta p + (1 - beta) q
    JSD_beta = beta KL(p || m) + (1 - beta) KL(q || m);   beta = 0: KL(p || q) (forward), 1: KL(q || p) (reverse)

Rows are fine-tuning rows: chat / instruction rows train on the answers' tokens, {"text"} rows on every
token. With `on_policy` > 0, that share of the micro-batches (seeded by their number) replaces the answers
with the student's own samples of the same prompts (GKD's on-policy mix, lambda), scored by the teacher. The teacher must share the student's tokenizer: every student token has the same id in the teacher's
vocabulary, which may be longer (Qwen2.5 <= 3B: 151,936 entries; >= 7B: 152,064, padding), and its extra
logits are sliced off; anything else is refused.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab.data.examples import IGNORE_INDEX
from gptlab.errors import GptlabError


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.5,
                    temperature: float = 1.0) -> torch.Tensor:
    """JSD_beta per row of (N, V) logits (a teacher's longer vocabulary sliced to the student's first)."""
    teacher_logits = teacher_logits[..., : student_logits.shape[-1]]
    q = F.log_softmax(student_logits / temperature, dim=-1)
    p = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        return F.kl_div(q, p, reduction="none", log_target=True).sum(-1)  # KL(p || q)
    if beta == 1:
        return F.kl_div(p, q, reduction="none", log_target=True).sum(-1)  # KL(q || p)
    b = torch.tensor(beta, dtype=q.dtype, device=q.device)
    m = torch.logsumexp(torch.stack([q + torch.log1p(-b), p + torch.log(b)]), dim=0)
    return (b * F.kl_div(m, p, reduction="none", log_target=True)
            + (1 - b) * F.kl_div(m, q, reduction="none", log_target=True)).sum(-1)


def check_compatible(student_tok, teacher_tok, student_vocab: int, teacher_vocab: int, teacher: str) -> None:
    """One clear error unless the teacher reads the student's token ids as the same tokens."""
    if teacher_vocab < student_vocab:
        raise GptlabError(f"the teacher {teacher} has a vocabulary of {teacher_vocab}, smaller than the student's "
                          f"{student_vocab}: distillation needs the teacher to score every student token")
    ours = student_tok.backend.get_vocab(with_added_tokens=True)
    theirs = teacher_tok.backend.get_vocab(with_added_tokens=True)
    differ = [t for t, i in ours.items() if theirs.get(t) != i]
    if differ:
        shown = ", ".join(repr(t) for t in sorted(differ)[:3])
        raise GptlabError(f"the teacher {teacher} has a different tokenizer: {len(differ)} of the student's "
                          f"{len(ours)} tokens ({shown}, ...) have other ids or are missing; distillation needs "
                          "a teacher of the same tokenizer family")


class DistillLoss:
    """The Trainer's loss_fn: (summed JSD over trained tokens, tokens, {"kl": summed KL(teacher || student)})."""

    def __init__(self, teacher: nn.Module, beta: float = 0.5, temperature: float = 1.0, tokenizer=None,
                 max_new_tokens: int = 64) -> None:
        self.teacher, self.beta, self.temperature = teacher.eval().requires_grad_(False), beta, temperature
        self.tokenizer, self.max_new_tokens = tokenizer, max_new_tokens

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        on_policy = bool(batch.get("on_policy", False))
        if on_policy:  # the student's own completions of the prompts, sampled at temperature 1
            batch = student_samples(model, self.tokenizer, batch, self.max_new_tokens, 1.0)
        mask = batch["labels"] != IGNORE_INDEX  # the positions whose next token is trained
        student = model(batch["input_ids"])[mask].float()  # (N, V)
        with torch.no_grad():
            teacher = self.teacher(batch["input_ids"])[mask].float()
        jsd = generalized_jsd(student, teacher, self.beta, self.temperature)
        with torch.no_grad():
            kl = generalized_jsd(student, teacher, 0.0, 1.0) if self.beta != 0 or self.temperature != 1 else jsd
        n = mask.sum()
        return jsd.sum(), n, {"kl": kl.detach().sum(), "on_policy": n.float() * on_policy}


# ---------------------------------------------------------------------------------------------------------
# on-policy: the student's own samples for a share of the steps (GKD's lambda)


class OnPolicyBatches:
    """A BatchSource whose batch `index` is marked on-policy for a seeded share `fraction` of the micro-batches,
    with a sampling seed from its number: resume and data-parallel splits mark and sample the same."""

    def __init__(self, inner, fraction: float, seed: int) -> None:
        self.inner, self.fraction, self.seed = inner, fraction, seed

    def __len__(self) -> int:
        return len(self.inner)

    def batch(self, index: int, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
        out = self.inner.batch(index, rank, world)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        on = bool(torch.rand((), generator=g) < self.fraction)
        return {**out, "on_policy": torch.tensor(on), "seed": torch.tensor(self.seed * 1_000_003 + (index * world + rank) * 4096)}


def student_samples(model: nn.Module, tokenizer, batch: dict[str, torch.Tensor], max_new_tokens: int,
                    temperature: float) -> dict[str, torch.Tensor]:
    """The batch's prompts (each row up to its first trained token) completed by the student itself."""
    from gptlab.infer.generate import engine_for
    from gptlab.infer.sampling import Sampling
    from gptlab.train.runtime import unwrap

    ids, labels = batch["input_ids"], batch["labels"]
    prompts = []
    for r in range(ids.shape[0]):
        trained = (labels[r] != IGNORE_INDEX).nonzero()
        if len(trained) == 0 or int(trained[0]) == 0:
            raise GptlabError("--on-policy needs rows with a prompt (chat / instruction rows), not plain text rows")
        prompts.append(ids[r, : int(trained[0]) + 1].tolist())
    m = unwrap(model)
    was_training = m.training
    m.eval()
    base = int(batch["seed"])
    samplings = [Sampling(max_new_tokens=max_new_tokens, temperature=temperature, seed=base + i)
                 for i in range(len(prompts))]
    with torch.no_grad():
        outs = engine_for(m, tokenizer, [len(p) for p in prompts], samplings[0]).generate(prompts, samplings)
    m.train(was_training)
    eos = tokenizer.eos_id
    rows = [p + o.outputs[0].sampled_ids(eos) for p, o in zip(prompts, outs)]
    T = max(len(r) for r in rows) - 1
    x = torch.full((len(rows), T), tokenizer.pad_id if tokenizer.pad_id is not None else (eos or 0), dtype=torch.long)
    y = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for i, (p, row) in enumerate(zip(prompts, rows)):
        t = torch.tensor(row)
        x[i, : len(row) - 1] = t[:-1]
        y[i, len(p) - 1: len(row) - 1] = t[len(p):]
    return {"input_ids": x.to(ids.device), "labels": y.to(ids.device)}
