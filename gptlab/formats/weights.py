"""Our state dict <-> HF tensors, by the family's `WeightRow`s (gptlab/formats/families/).

Loading concatenates the HF tensors of a row (along the output dim) into ours; saving splits ours back.
Rows whose target this model does not have (a bias the config leaves out, a tied head) are skipped, so one
table serves every config of a family. `linear_slices` pushes row indices through the same tables to say
which rows of which of our Linears each HF Linear module is (what LoRA targets and PEFT adapters name).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from gptlab.formats import families
from gptlab.formats.family import WeightRow
from gptlab.models.config import Config


def expand_rows(config: Config, ours: set[str]) -> list[tuple[str, list[list[str]], WeightRow]]:
    """Concrete rows for this config: (our name, HF names per expert (one list when not per-expert), row).

    A weight whose layer holds integers (a QuantLinear, gptlab/models/quant.py: `.qweight` and `.scales` instead
    of `.weight`) gives two rows, `.weight` renamed in both names: the integers and scales split and reorder by
    output rows exactly as the weight does, and are never transposed (int4 packs pairs along the input dim).
    """
    out = []
    for row in families.get(config.model_type).weights:
        layers = range(config.n_layer) if "{i}" in row.ours else [None]
        for i in layers:
            name = row.ours.format(i=i)
            hf = [h.replace("{i}", str(i)) for h in row.hf]
            if name not in ours and name.endswith(".weight") and _renamed(name, "qweight") in ours:
                for part in ("qweight", "scales"):
                    out.append((_renamed(name, part), [[_renamed(h, part) for h in hf]], replace(row, transpose=False)))
                continue
            if name not in ours:
                continue
            groups = [[h.replace("{e}", str(e)) for h in hf] for e in range(config.n_expert)] if row.per_expert else [hf]
            out.append((name, groups, row))
    return out


def _renamed(weight_name: str, part: str) -> str:
    return f"{weight_name.removesuffix('.weight')}.{part}"


def our_names(model: nn.Module) -> set[str]:
    """The state-dict names a checkpoint stores (a tied head is the embedding, stored once)."""
    names = set(model.state_dict().keys())
    if model.config.tie_embeddings:
        names.discard("lm_head.weight")
    return names


def _per_head_qkv(t: torch.Tensor, config: Config, to_ours: bool) -> torch.Tensor:
    nh, hs = config.n_head, config.head_dim
    rest = t.shape[1:]
    if to_ours:  # (nh, 3, hs, ...) -> (3, nh, hs, ...)
        return t.reshape(nh, 3, hs, *rest).transpose(0, 1).reshape(3 * nh * hs, *rest)
    return t.reshape(3, nh, hs, *rest).transpose(0, 1).reshape(3 * nh * hs, *rest)


def hf_to_ours(config: Config, ours: set[str], get: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Build our state dict from HF tensors fetched by name with `get`."""
    sd = {}
    for name, groups, row in expand_rows(config, ours):
        stacked = []
        for hf_names in groups:
            parts = [get(h) for h in hf_names]
            if row.transpose:
                parts = [p.t() if p.ndim == 2 else p for p in parts]
            t = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
            if row.qkv_per_head:
                t = _per_head_qkv(t, config, to_ours=True)
            stacked.append(t)
        sd[name] = torch.stack(stacked) if row.per_expert else stacked[0]
    return sd


def ours_to_hf(config: Config, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Split our state dict into HF tensors (the inverse of `hf_to_ours`)."""
    out = {}
    for name, groups, row in expand_rows(config, set(state)):
        t = state[name]
        for e, hf_names in enumerate(groups):
            te = t[e] if row.per_expert else t
            if row.qkv_per_head:
                te = _per_head_qkv(te, config, to_ours=False)
            for h, piece in zip(hf_names, te.split(_split_sizes(config, te.shape[0], len(hf_names)), dim=0)):
                if row.transpose and piece.ndim == 2:
                    piece = piece.t()
                out[h] = piece.contiguous()
    return out


def _split_sizes(config: Config, total: int, n: int) -> list[int]:
    if n == 1:
        return [total]
    if n == 3:  # q, k, v
        hs = config.head_dim
        return [config.n_head * hs, config.n_kv_head * hs, config.n_kv_head * hs]
    return [total // n] * n  # gate, up


# ---------------------------------------------------------------------------------------------------------
# HF Linear modules as slices of ours


@dataclass(frozen=True)
class LinearSlice:
    """One HF Linear module as some output rows of one of our Linears."""

    ours: str  # our module, e.g. "blocks.0.attn.qkv"
    hf: str  # the HF module, e.g. "model.layers.0.self_attn.k_proj"
    rows: tuple[int, ...]  # our output rows, in the HF module's row order
    transposed: bool  # HF stores it as Conv1D (in, out): PEFT's fan_in_fan_out

    @property
    def span(self) -> tuple[int, int]:
        return min(self.rows), max(self.rows) + 1


def linear_slices(model: nn.Module) -> list[LinearSlice]:
    """Every HF Linear module of `model`'s family with the rows of our Linear it maps to.

    Derived by pushing row indices through `ours_to_hf`: an index column for each of our Linear weights
    comes out split (q/k/v, gate/up), reordered (GPT-NeoX's per-head interleave) and transposed exactly as
    the weights would be, so the family tables stay the one source of truth.
    """
    config = model.config
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if config.tie_embeddings:
        linears.pop("lm_head", None)  # a LoRA on a tied head would also move the input embedding
    index = {f"{n}.weight": torch.arange(m.out_features)[:, None] for n, m in linears.items()}
    source, transposed = {}, {}
    for name, groups, row in expand_rows(config, set(index)):
        transposed[name] = row.transpose
        source.update({h: name for group in groups for h in group})
    return [
        LinearSlice(source[h].removesuffix(".weight"), h.removesuffix(".weight"), tuple(t.flatten().tolist()),
                    transposed[source[h]])
        for h, t in ours_to_hf(config, index).items()
    ]
