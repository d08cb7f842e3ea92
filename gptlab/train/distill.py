"""Logit distillation from a teacher (`--task distill --teacher DIR`): the generalised Jensen-Shannon
divergence of Agarwal et al. 2024 ("On-policy distillation of language models", GKD), as TRL's GKDTrainer
defines it, per trained token:

    p = softmax(teacher / T), q = softmax(student / T), m = beta p + (1 - beta) q
    JSD_beta = beta KL(p || m) + (1 - beta) KL(q || m);   beta = 0: KL(p || q) (forward), 1: KL(q || p) (reverse)

Rows are fine-tuning rows: chat / instruction rows train on the answers' tokens, {"text"} rows on every
token. The teacher must share the student's tokenizer: every student token has the same id in the teacher's
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

    def __init__(self, teacher: nn.Module, beta: float = 0.5, temperature: float = 1.0) -> None:
        self.teacher, self.beta, self.temperature = teacher.eval().requires_grad_(False), beta, temperature

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        mask = batch["labels"] != IGNORE_INDEX  # the positions whose next token is trained
        student = model(batch["input_ids"])[mask].float()  # (N, V)
        with torch.no_grad():
            teacher = self.teacher(batch["input_ids"])[mask].float()
        jsd = generalized_jsd(student, teacher, self.beta, self.temperature)
        with torch.no_grad():
            kl = generalized_jsd(student, teacher, 0.0, 1.0) if self.beta != 0 or self.temperature != 1 else jsd
        return jsd.sum(), mask.sum(), {"kl": kl.detach().sum()}
