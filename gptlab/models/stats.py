"""Size and cost of a Config without weights: parameter counts, FLOPs per token, memory, MFU.

Parameters are counted exactly by building the model's modules on the meta device (no memory is
allocated), so the count is the model's own and follows every Config field, tied embeddings included.

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

from gptlab.dtypes import parse_dtype
from gptlab.models.config import Config


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
    from gptlab.models.model import GPT, Block, MoE

    config = Config.from_dict(json.loads(key))
    # Layers differ in parameters only by MoE vs dense MLP (windows add none), so the model is built on the
    # meta device as its shell (embeddings, final norm, head) plus one block of each kind, counted per layer:
    # exact, and fast even for a 94-layer, 128-expert config. test_presets checks it against whole builds.
    with torch.device("meta"):
        shell = GPT(config.replace(n_layer=0, layer_windows=[], dense_layers=[]))
        kinds = {config.is_moe_layer(i) for i in range(config.n_layer)}
        blocks = {moe: Block(config, next(i for i in range(config.n_layer) if config.is_moe_layer(i) == moe))
                  for moe in kinds}
    per_kind = {moe: sum(p.numel() for p in b.parameters()) for moe, b in blocks.items()}
    inactive_kind = {moe: 0 for moe in kinds}
    for moe, block in blocks.items():
        if isinstance(block.mlp, MoE):
            experts = block.mlp.gate_up.numel() + block.mlp.down.numel()
            inactive_kind[moe] = experts * (config.n_expert - config.n_expert_per_token) // config.n_expert
    layer_kinds = [config.is_moe_layer(i) for i in range(config.n_layer)]
    total = sum(p.numel() for p in shell.parameters()) + sum(per_kind[k] for k in layer_kinds)  # tied head once
    inactive = sum(inactive_kind[k] for k in layer_kinds)
    embedding = shell.wte.weight.numel() + (shell.wpe.weight.numel() if shell.wpe is not None else 0)
    if not config.tie_embeddings:
        embedding += shell.lm_head.weight.numel()
    active = total - inactive
    counts = dict(
        total=total, embedding=embedding, non_embedding=total - embedding, active=active,
        active_non_embedding=active - embedding, head=shell.lm_head.weight.numel(),
    )
    return tuple(counts.items())


def flops_per_token(config: Config, seq_len: int | None = None, training: bool = False) -> float:
    """Model FLOPs per token at sequence length `seq_len` (default: the full context).

    forward = 2 * (active non-embedding params + lm_head weights) + 4 * n_head * head_dim * sum_l ctx_l,
    ctx_l = min(seq_len, window_l) (PaLM appendix B; nanoGPT `estimate_mfu`). The input embedding is a
    lookup (no FLOPs); the lm_head is a real matmul, counted whether tied or not. training = 3 x forward.
    Causal masking is not discounted (the PaLM / nanoGPT convention MFU figures are quoted in).
    """
    seq_len = config.context_length if seq_len is None else seq_len
    counts = count_params(config)
    matmul = counts["active_non_embedding"] + counts["head"]
    ctx = sum(min(seq_len, config.window(i)) if config.window(i) else seq_len for i in range(config.n_layer))
    forward = 2 * matmul + 2 * 2 * config.n_head * config.head_dim * ctx
    return float(3 * forward if training else forward)


def weight_bytes(config: Config, dtype: torch.dtype | str = torch.bfloat16) -> int:
    """Bytes the weights take in `dtype` (all parameters, a tied lm_head once)."""
    return count_params(config)["total"] * parse_dtype(dtype).itemsize


def kv_cache_bytes(config: Config, seq_len: int | None = None, batch_size: int = 1,
                   dtype: torch.dtype | str = torch.bfloat16) -> int:
    """Bytes of a KV cache for `batch_size` rows of `seq_len` tokens (default: the full context).

    Keys and values, every layer, n_kv_head * head_dim per token (GQA/MQA shrink it); gptlab's caches keep
    every slot even for local-window layers, so windows do not reduce it.
    """
    seq_len = config.context_length if seq_len is None else seq_len
    per_token = 2 * config.n_layer * config.n_kv_head * config.head_dim
    return per_token * seq_len * batch_size * parse_dtype(dtype).itemsize


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOPs / the hardware's peak (PaLM appendix B).

    tokens_per_s: tokens processed per second per device; flops_per_token: `flops_per_token(config, seq_len,
    training=True)` for training; peak_flops: the device's peak for the dtype used, e.g. 989e12 for an H100
    SXM in dense bf16.
    """
    return tokens_per_s * flops_per_token / peak_flops


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
