"""`gptlab models` (the preset table) and `gptlab info MODEL` (a preset, model dir or hub id, without weights).

Every number printed is computed from a Config (`gptlab.models.stats`), so the table cannot drift from the presets.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from gptlab import kernels
from gptlab.cli import command
from gptlab.dtypes import parse_dtype
from gptlab.errors import GptlabError
from gptlab.formats import hf
from gptlab.formats.quantized import stored_in
from gptlab.formats.quantized import weight_bytes as quantized_bytes
from gptlab.models.config import Config
from gptlab.models.describe import context_str, heads_str, mlp_str, norm_str, params_str, positions_str
from gptlab.models.presets import FAMILIES, PRESETS
from gptlab.models.stats import count_params, flops_per_token, human, human_bytes, kv_cache_bytes, weight_bytes


# ---------------------------------------------------------------------------------------------------------
# gptlab models


def table(rows: list[list[str]], right: set[int]) -> str:
    """Plain aligned columns; column indices in `right` are right-aligned (numbers)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@command("models")
def models(family: str | None = None) -> None:
    """List the named model presets (usable wherever a Config is named, e.g. `Config.from_name`).

    Parameters are exact counts of the built model (total, and active per token for mixture-of-experts);
    weights is their size in bfloat16. heads is query heads / key-value heads where they differ.

    Args:
        family: show only this family (e.g. gpt2, pythia, qwen3) or HF model_type (e.g. gpt_neox).
    """
    names = list(PRESETS)
    if family is not None:
        names = [n for n in names if family in (FAMILIES[n], PRESETS[n].get("model_type"))]
        if not names:
            known = sorted(set(FAMILIES.values()) | {p["model_type"] for p in PRESETS.values()})
            raise GptlabError(f"no presets of family {family!r} (families: {', '.join(known)})")
    header = ["name", "family", "model_type", "params", "layers", "width", "heads", "context", "positions", "norm",
              "mlp", "weights", "hf repo"]
    rows = [header]
    for name in names:
        c = Config.from_name(name)
        rows.append([
            name, FAMILIES[name], c.model_type, params_str(c), str(c.n_layer), str(c.n_embd), heads_str(c),
            context_str(c.context_length), positions_str(c), norm_str(c), mlp_str(c),
            human_bytes(weight_bytes(c, torch.bfloat16)), c.hf_repo or "-",
        ])
    print(table(rows, right={3, 4, 5, 6, 7, 11}))


# ---------------------------------------------------------------------------------------------------------
# gptlab info


def _locate(model: str) -> tuple[str, Path | None]:
    """('dir', path), ('preset', None) or ('hub', path of its fetched metadata); a local dir wins."""
    p = Path(model).expanduser()
    if p.is_dir():
        return "dir", p
    if model in PRESETS:
        return "preset", None
    if p.exists():
        raise GptlabError(f"{model} is a file; pass the model directory that holds config.json")
    if hf.looks_like_path(model):
        raise GptlabError(f"model directory {model} does not exist")
    if "/" not in model:
        raise GptlabError(f"{model!r} is neither a model directory nor a preset; `gptlab models` lists the presets")
    return "hub", hf.hub_snapshot(model, hf.HUB_CONFIG_PATTERNS, what="fetching the config.json of")


def _checkpoint_dtype(path: Path) -> str:
    raw = json.loads((path / "config.json").read_text())
    return raw.get("dtype") or raw.get("torch_dtype") or "float32"  # transformers' default when absent


def _tokenizer_size(path: Path) -> int | None:
    """Ids in tokenizer.json (vocabulary + added tokens), or None when it cannot be read cheaply."""
    try:
        d = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
        ids = list((d.get("model") or {}).get("vocab", {}).values()) + [t["id"] for t in d.get("added_tokens", [])]
        return max(ids) + 1 if ids and all(isinstance(i, int) for i in ids) else None
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def _tokenizer_str(path: Path, vocab_size: int | None = None) -> str:
    cfg: dict[str, Any] = {}
    if (path / "tokenizer_config.json").is_file():
        try:
            cfg = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return "tokenizer_config.json is not valid JSON"
    if (path / "tokenizer.json").is_file():
        kind = "tokenizer.json"
    elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        kind = "vocab.json + merges.txt"
    elif cfg:
        kind = "tokenizer_config.json only (tokenizer files not fetched)"
    else:
        return "none"
    template = bool(cfg.get("chat_template")) or (path / "chat_template.jinja").is_file()
    size = _tokenizer_size(path) if kind == "tokenizer.json" else None
    warn = ""
    if size is not None and vocab_size is not None and size > vocab_size:
        warn = (f"; WARNING: {size:,} token ids but the model has {vocab_size:,}: ids past it cannot run "
                f"(not this model's tokenizer?)")
    return f"{kind}, {'with' if template else 'no'} chat template{warn}"


def _weights_str(path: Path) -> str:
    files = sorted(path.glob("*.safetensors"))
    if files:
        return f"{len(files)} safetensors file(s), {human_bytes(sum(f.stat().st_size for f in files))} on disk"
    if (path / "model.safetensors.index.json").is_file():
        return "sharded safetensors (not downloaded)"
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        return "pickled .bin/.pt only (gptlab loads safetensors; convert them first)"
    return "none"


def _quantized_lines(c: Config, stored, dtype: torch.dtype, dtype_name: str) -> list[tuple[str, str]]:
    """What an int8 / int4 dir (gptlab export --format int8|int4) holds, and its weights' size."""
    scales = "one scale per output channel" if stored.scheme == "int8" else "one scale per 32 weights"
    odd = sum(k == "int8" for k in stored.modules.values()) if stored.scheme == "int4" else 0
    layers = f"{len(stored.modules)} linear layers" + (f" ({odd} int8: input width not a multiple of 32)" if odd else "")
    rest = "embeddings, norms" + (", routers and experts" if c.mlp == "moe" else "")
    return [
        ("quantized", f"{stored.scheme} weights, {scales}: {layers}; {rest} in {dtype_name}; inference only"),
        ("weights", f"{human_bytes(quantized_bytes(c, stored, dtype))} ({human_bytes(weight_bytes(c, dtype))} "
                    f"unquantized in {dtype_name})"),
    ]


@command("info")
def info(model: str, seq_len: int | None = None, batch_size: int = 1) -> None:
    """Describe a model without loading its weights: family, size, context, dtype, memory, tokenizer.

    Memory is estimated for the weights in the checkpoint's dtype (config.json `dtype`; bfloat16 for a
    preset) and for a static KV cache of batch_size rows at seq_len tokens (default: the full context).

    Args:
        model: a model directory (config.json), a hub id (org/name; only config and tokenizer metadata are
            fetched) or a preset name from `gptlab models`.
        seq_len: tokens per row for the KV-cache estimate (default: the model's context).
        batch_size: rows for the KV-cache estimate.
    """
    kind, path = _locate(model)
    stored = None
    if path is None:
        config, dtype_name = Config.from_name(model), "bfloat16"
    else:
        config, dtype_name = hf.read_config(path), _checkpoint_dtype(path)
        stored = stored_in(path)
    dtype = parse_dtype(dtype_name)
    seq = config.context_length if seq_len is None else seq_len
    if seq < 1 or batch_size < 1:
        raise GptlabError("seq_len and batch_size must be >= 1")
    counts = count_params(config)
    c = config
    lines: list[tuple[str, str]] = [("model", model if kind == "preset" else str(path))]
    if kind == "preset":
        lines.append(("preset", f"{FAMILIES[model]} family; hf repo {c.hf_repo or '- (architecture only)'}"))
    lines += [
        ("model_type", c.model_type),
        ("parameters", f"{counts['total']:,} ({human(counts['total'])}); non-embedding "
                       f"{human(counts['non_embedding'])}" + ("" if c.tie_embeddings else "; untied lm_head")),
    ]
    if counts["active"] != counts["total"]:
        lines.append(("active", f"{counts['active']:,} ({human(counts['active'])}) per token: "
                                f"{c.n_expert_per_token} of {c.n_expert} experts"))
    lines += [
        ("layers", f"{c.n_layer} x width {c.n_embd}, heads {heads_str(c)}, head dim {c.head_dim}"),
        ("context", f"{c.context_length:,} tokens"),
        ("positions", positions_str(c, theta=True)),
        ("norm", f"{norm_str(c)}, eps {c.norm_eps:g}"),
        ("mlp", f"{mlp_str(c)}, hidden {c.moe_intermediate_size if c.mlp == 'moe' else c.intermediate_size}"),
        ("vocab", f"{c.vocab_size:,}"),
        ("dtype", dtype_name + (" (assumed for a preset)" if kind == "preset" else "")),
    ]
    if stored is not None:
        lines += _quantized_lines(c, stored, dtype, dtype_name)
    else:
        lines.append(("weights", f"{human_bytes(weight_bytes(c, dtype))} in {dtype_name}"))
    lines += [
        ("kv cache", f"{human_bytes(kv_cache_bytes(c, seq, batch_size, dtype))} for {batch_size} x {seq:,} tokens "
                     f"in {dtype_name}"),
        ("flops", f"{human(flops_per_token(c, seq))} per token forward at {seq:,} tokens (x3 to train)"),
    ]
    if path is not None:
        lines.append(("tokenizer", _tokenizer_str(path, c.vocab_size)))
        lines.append(("files", _weights_str(path) if kind == "dir" else "weights not fetched (info reads config.json)"))
    lines.append(("cpu kernels", kernels.summary()))
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        print(f"{k.ljust(width)}  {v}")
