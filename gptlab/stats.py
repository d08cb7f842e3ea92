"""Size and cost of a Config without weights: parameter counts, FLOPs per token, memory, MFU.

Parameters are counted exactly by building the model on the meta device (no memory is allocated), so the
count is the model's own and follows every Config field, tied embeddings included.

FLOPs follow the PaLM paper's appendix B (Chowdhery et al. 2022), the estimate nanoGPT's `estimate_mfu`
uses: a matmul with N weights costs 2N FLOPs per token forward, and attention adds
2 * n_layer * ctx * n_head * head_dim * 2 (q @ k^T and att @ v) per token, where ctx is the number of keys
a query sees (seq_len, or the local window when that is shorter). Training is 3x forward (backward costs
twice the forward: Kaplan et al. 2020, sec. 2.1), giving PaLM's 6N + 12 * L * H * Q * T.
"""

from __future__ import annotations

import json
from functools import lru_cache

import torch

from gptlab.config import Config


def count_params(config: Config) -> dict[str, int]:
    """Exact parameter counts of `config`'s model.

    Returns a dict with
      total: every distinct parameter (a tied lm_head counts once),
      embedding: token + learned position embeddings, and the lm_head weight when it is not tied (the
        "non-embedding" convention of Kaplan et al. 2020 and the Pythia / Qwen model cards),
      non_embedding: total - embedding,
      active: parameters one token uses (MoE: only its n_expert_per_token routed experts; = total if dense),
      active_non_embedding: active - embedding,
      head: weights of the output projection (lm_head), tied or not; it is matmul work on every token.
    """
    return dict(_count(_key(config)))


def _key(config: Config) -> str:
    return json.dumps(config.to_dict(), sort_keys=True)


@lru_cache(maxsize=256)
def _count(key: str) -> tuple[tuple[str, int], ...]:
    from gptlab.model import GPT, MoE

    config = Config.from_dict(json.loads(key))
    with torch.device("meta"):
        model = GPT(config)
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    embedding = model.wte.weight.numel() + (model.wpe.weight.numel() if model.wpe is not None else 0)
    if not config.tie_embeddings:
        embedding += model.lm_head.weight.numel()
    inactive = 0
    for module in model.modules():
        if isinstance(module, MoE):
            experts = module.gate_up.numel() + module.down.numel()
            inactive += experts * (config.n_expert - config.n_expert_per_token) // config.n_expert
    active = total - inactive
    counts = dict(
        total=total, embedding=embedding, non_embedding=total - embedding, active=active,
        active_non_embedding=active - embedding, head=model.lm_head.weight.numel(),
    )
    return tuple(counts.items())


def flops_per_token(config: Config, seq_len: int | None = None, training: bool = False) -> float:
    """Model FLOPs per token at sequence length `seq_len` (default: the full context).

    forward = 2 * (active non-embedding params + lm_head weights) + 4 * n_head * head_dim * sum_l ctx_l,
    ctx_l = min(seq_len, window_l) (PaLM appendix B; nanoGPT `estimate_mfu`). The input embedding is a
    lookup (no FLOPs); the lm_head is a real matmul, counted whether tied or not. training = 3 x forward.
    Causal masking is not discounted (the PaLM / nanoGPT convention MFU figures are quoted in).
    """
    seq_len = config.block_size if seq_len is None else seq_len
    counts = count_params(config)
    matmul = counts["active_non_embedding"] + counts["head"]
    ctx = sum(min(seq_len, config.window(i)) if config.window(i) else seq_len for i in range(config.n_layer))
    forward = 2 * matmul + 2 * 2 * config.n_head * config.head_dim * ctx
    return float(3 * forward if training else forward)


def weight_bytes(config: Config, dtype: torch.dtype | str = torch.bfloat16) -> int:
    """Bytes the weights take in `dtype` (all parameters, a tied lm_head once)."""
    from gptlab.hf import parse_dtype

    return count_params(config)["total"] * parse_dtype(dtype).itemsize


def kv_cache_bytes(config: Config, seq_len: int | None = None, batch_size: int = 1,
                   dtype: torch.dtype | str = torch.bfloat16) -> int:
    """Bytes of a KV cache for `batch_size` rows of `seq_len` tokens (default: the full context).

    Keys and values, every layer, n_kv_head * head_dim per token (GQA/MQA shrink it); gptlab's static cache
    (`GPT.setup_cache`) keeps every slot even for local-window layers, so windows do not reduce it.
    """
    from gptlab.hf import parse_dtype

    seq_len = config.block_size if seq_len is None else seq_len
    per_token = 2 * config.n_layer * config.n_kv_head * config.head_dim
    return per_token * seq_len * batch_size * parse_dtype(dtype).itemsize


def mfu(tokens_per_s: float, config: Config, seq_len: int, peak_flops: float, training: bool = True) -> float:
    """Model FLOPs utilisation: achieved model FLOPs / the hardware's peak (PaLM appendix B).

    tokens_per_s: tokens processed per second (training: tokens per optimizer-step time x steps/s).
    peak_flops: the accelerator's peak for the dtype used, e.g. 989e12 for an H100 SXM in dense bf16.
    """
    return tokens_per_s * flops_per_token(config, seq_len, training=training) / peak_flops


def human(n: float, unit: str = "") -> str:
    """124439808 -> '124.4M'; 1.5e12 -> '1.5T' (decimal prefixes, as model names use)."""
    for div, prefix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.1f}{prefix}{unit}"
    return f"{n:g}{unit}"


def human_bytes(n: int) -> str:
    """Bytes in binary units (GiB), as memory is sold and reported by nvidia-smi."""
    for div, prefix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:.1f} {prefix}"
    return f"{n} B"
