"""LoRA in PEFT's terms: targets chosen by HF (or gptlab) module name, and adapters in PEFT's layout: adapter_config.json + adapter_model.safetensors, keys such as
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, so `peft.PeftModel.from_pretrained` and vLLM
load what gptlab saves, and PEFT adapters load here (safetensors only: a pickled adapter_model.bin is refused).

A LoRA on a whole fused layer (our `qkv` on a Qwen model) is exported exactly as one LoRA per HF module
sharing A, with B split by rows: B @ A restricted to the q rows is B[q] @ A.

GPT-1/GPT-2 store weights as Conv1D (in, out); PEFT keeps lora_A (r, in) and lora_B (out, r) as for a
Linear and only transposes the merged delta (`fan_in_fan_out`), so the tensors need no transposition here,
only the flag in adapter_config.json.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from gptlab.errors import GptlabError
from gptlab.formats.files import read_json, staged_dir
from gptlab.formats.weights import LinearSlice, linear_slices
from gptlab.models.lora import LoRALinear, adapter_names, add_lora, is_lora_parameter, lora_layer_at, lora_layers

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


# ---------------------------------------------------------------------------------------------------------
# LoRA targets by name


def _matches(path: str, target: str) -> bool:
    # PEFT's rule for target_modules entries: the full name, or a suffix after a dot
    return path == target or path.endswith("." + target)


def _check_not_quantized(model: nn.Module) -> None:
    if getattr(model, "quantization", None):  # gptlab/models/quant.py: its layers are no longer nn.Linear
        raise GptlabError(f"this model holds {model.quantization} weights; LoRA adapters attach to full-precision "
                          f"layers: use the original model")


def lora_plan(model: nn.Module, targets: list[str] | tuple[str, ...] | str) -> dict[str, list[tuple[int, int]]]:
    """{our module: [row spans]} for `targets` (HF names, our names, or "all-linear"), for `add_lora`."""
    if isinstance(targets, str):
        targets = [targets]
    _check_not_quantized(model)
    ps = linear_slices(model)
    if not targets:
        raise GptlabError("LoRA needs at least one target module (e.g. q_proj, v_proj, c_attn or qkv)")
    chosen: dict[str, set[tuple[int, int]]] = {}
    sizes = {p.ours: model.get_submodule(p.ours).out_features for p in ps}
    for t in targets:
        hit = False
        for p in ps:
            if t == "all-linear" and p.ours != "lm_head":
                chosen.setdefault(p.ours, set()).add((0, sizes[p.ours]))
                hit = True
            elif _matches(p.hf, t):
                chosen.setdefault(p.ours, set()).add(p.span)
                hit = True
            elif _matches(p.ours, t):
                chosen.setdefault(p.ours, set()).add((0, sizes[p.ours]))
                hit = True
        if not hit:
            hf_leaves = sorted({p.hf.rsplit(".", 1)[-1] for p in ps})
            our_leaves = sorted({".".join(p.ours.split(".")[-2:]) for p in ps})
            raise GptlabError(
                f"LoRA target {t!r} matches no Linear of this {model.config.model_type} model; "
                f"HF names: {', '.join(hf_leaves)}; gptlab names: {', '.join(our_leaves)}; or all-linear"
            )
    out = {}
    for name, spans in chosen.items():
        spans = sorted(spans)
        for (a0, b0), (a1, b1) in zip(spans, spans[1:]):
            if a1 < b0:
                raise GptlabError(
                    f"LoRA targets overlap on {name} (rows {a0}:{b0} and {a1}:{b1}): name either the fused "
                    f"layer or its parts, not both"
                )
        out[name] = spans
    return out


def apply_lora(
    model: nn.Module,
    targets: list[str] | tuple[str, ...] | str = ("qkv",),
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    rslora: bool = False,
) -> nn.Module:
    """LoRA on the targeted Linear layers of a gptlab GPT, everything else frozen (`add_lora`).

    targets: HF module names (c_attn, q_proj, v_proj, gate_proj, ...), gptlab names (qkv, attn.proj,
      mlp.fc, ...) or "all-linear"; matched as PEFT matches target_modules (whole name or dotted suffix).
    """
    return add_lora(model, lora_plan(model, targets), r=r, alpha=alpha, dropout=dropout, rslora=rslora)


# ---------------------------------------------------------------------------------------------------------
# adapter files


def peft_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors with PEFT key names, LoRA fields of adapter_config.json) for the model's adapters."""
    layers = lora_layers(model)
    if not layers:
        raise GptlabError("this model has no LoRA layers to save")
    tensors: dict[str, torch.Tensor] = {}
    leaves, flips, ranks, alphas, drops = set(), set(), set(), set(), set()
    for p in linear_slices(model):
        layer = layers.get(p.ours)
        if layer is None:
            continue
        start, stop = p.span
        k = next((k for k, (a, b) in enumerate(layer.spans) if a <= start and stop <= b), None)
        if k is None:
            if any(a < stop and start < b for a, b in layer.spans):
                raise GptlabError(f"a LoRA on {p.ours} covers part of {p.hf} only; PEFT cannot express that")
            continue
        a = layer.spans[k][0]
        rows = torch.tensor(p.rows, device=layer.lora_B[k].device) - a
        # a fused adapter's A is written once per HF module (clone: safetensors refuses shared storage)
        tensors[f"{PEFT_PREFIX}{p.hf}.lora_A.weight"] = layer.lora_A[k].detach().clone()
        tensors[f"{PEFT_PREFIX}{p.hf}.lora_B.weight"] = layer.lora_B[k].detach()[rows]
        leaves.add(p.hf.rsplit(".", 1)[-1])
        flips.add(p.transposed)
        ranks.add(layer.lora_A[k].shape[0])
        alphas.add(layer.alphas[k])
        drops.add(layer.lora_dropout.p)
    if len(flips) > 1:
        raise GptlabError("these LoRA targets mix Conv1D and Linear layers; PEFT has one fan_in_fan_out per adapter")
    if len(ranks) > 1 or len(alphas) > 1:
        raise GptlabError(f"adapters of different ranks/alphas ({sorted(ranks)}, {sorted(alphas)}) cannot share "
                          f"one adapter_config.json")
    r, alpha = ranks.pop(), alphas.pop()
    rslora = any(not math.isclose(s, alpha / r) for layer in layers.values() for s in layer.scales)
    fields = dict(
        peft_type="LORA", r=r, lora_alpha=alpha, lora_dropout=max(drops), target_modules=sorted(leaves),
        fan_in_fan_out=flips.pop(), bias="none", use_rslora=rslora, use_dora=False, init_lora_weights=True,
        inference_mode=True, rank_pattern={}, alpha_pattern={}, modules_to_save=None,
    )
    return tensors, fields


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    base_model: str | None = None,
    task_type: str = "CAUSAL_LM",
    extra_tensors: dict[str, torch.Tensor] | None = None,
    tokenizer=None,
) -> Path:
    """Write only the adapter, as PEFT does: adapter_config.json + adapter_model.safetensors.

    extra_tensors: whole modules trained alongside (HF names, e.g. {"score.weight": ...} for a classifier);
      listed in modules_to_save so PEFT restores them. Replaces an existing dir atomically.
    """
    from safetensors.torch import save_file

    tensors, fields = peft_state(model)
    extra = extra_tensors or {}
    tensors.update({PEFT_PREFIX + k: v.detach() for k, v in extra.items()})
    modules = sorted({k.rsplit(".", 1)[0] for k in extra})
    fields.update(task_type=task_type, base_model_name_or_path=base_model, modules_to_save=modules or None)
    path = Path(path)
    with staged_dir(path) as tmp:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(fields, indent=2) + "\n")
        save_file({k: v.to("cpu").contiguous() for k, v in tensors.items()}, str(tmp / ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp)
    return path


def read_adapter_config(path: str | os.PathLike) -> dict[str, Any]:
    f = Path(path) / ADAPTER_CONFIG
    if not f.is_file():
        raise GptlabError(f"{path} has no {ADAPTER_CONFIG}; is it a PEFT adapter directory?")
    cfg = read_json(f)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise GptlabError(f"{f}: peft_type={cfg.get('peft_type')!r}; gptlab loads LoRA adapters only")
    unsupported = [k for k in ("use_dora", "lora_bias", "rank_pattern", "alpha_pattern", "layers_to_transform",
                               "trainable_token_indices", "use_qalora") if cfg.get(k)]
    if cfg.get("bias", "none") != "none":
        unsupported.append(f"bias={cfg['bias']!r}")
    if unsupported:
        raise GptlabError(f"{f} uses LoRA options gptlab does not support: {', '.join(unsupported)}")
    return cfg


def _read_adapter(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """(adapter_config, {HF module: {"lora_A", "lora_B"}}, other tensors by HF name) of an adapter dir.
    Safetensors only: a pickled adapter_model.bin is refused, never unpickled."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg = read_adapter_config(path)
    f = path / ADAPTER_WEIGHTS
    if not f.is_file():
        if (path / "adapter_model.bin").is_file():
            raise GptlabError(f"{path} holds a pickled adapter_model.bin; gptlab reads safetensors only "
                              f"(re-save it with PEFT's safe_serialization=True)")
        raise GptlabError(f"{path} has no {ADAPTER_WEIGHTS}")
    try:
        tensors = load_file(str(f))
    except (SafetensorError, OSError) as e:
        raise GptlabError(f"could not read {f}: {e}") from None
    lora: dict[str, dict[str, torch.Tensor]] = {}
    extras: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        for part in ("lora_A", "lora_B"):
            if f".{part}." in name:
                module, _, rest = name.partition(f".{part}.")
                if rest not in ("weight", "default.weight"):
                    raise GptlabError(f"{f}: unexpected LoRA tensor {key}")
                lora.setdefault(module, {})[part] = t
                break
        else:
            if "lora_" in name:
                raise GptlabError(f"{f}: LoRA tensor {key} is not a Linear adapter gptlab supports")
            # PEFT may keep a modules_to_save copy's wrapper name; the HF name is what remains
            extras[name.replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".")] = t
    if not lora:
        raise GptlabError(f"{f} holds no LoRA tensors")
    for module, ab in lora.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise GptlabError(f"{f}: {module} lacks its {'lora_B' if 'lora_A' in ab else 'lora_A'} tensor")
        if ab["lora_A"].shape[0] != int(cfg["r"]):
            raise GptlabError(f"{f}: {module} has rank {ab['lora_A'].shape[0]}, adapter_config.json says r={cfg['r']}")
    return cfg, lora, extras


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> dict[str, torch.Tensor]:
    """Attach a PEFT LoRA adapter (gptlab- or PEFT-saved) to a gptlab GPT without LoRA layers; one adapter per
    HF module in the file. Returns the other saved tensors (modules_to_save, e.g. {"score.weight": ...}).

    name: load it as a named adapter beside others on the same base, for inference: it applies only to the
    rows `lora_routing` sends it (the engine routes each request's rows by its adapter); nothing is unfrozen.
    """
    path = Path(path)
    _check_not_quantized(model)
    if name is None and lora_layers(model):
        raise GptlabError("this model already has LoRA layers; use load_adapter_weights to refill them")
    if name is not None:
        if any(n is None for layer in lora_layers(model).values() for n in layer.names):
            raise GptlabError("this model has a trainable (unnamed) LoRA; named adapters go on a plain base model")
        if name in adapter_names(model):
            raise GptlabError(f"an adapter named {name!r} is already loaded")
    cfg, lora, extras = _read_adapter(path)
    if name is not None and extras:
        raise GptlabError(f"{path} also saves whole modules ({', '.join(sorted(extras)[:3])}); a named adapter "
                          f"served beside others can change LoRA weights only")
    alpha, rslora = float(cfg["lora_alpha"]), bool(cfg.get("use_rslora", False))
    dropout = float(cfg.get("lora_dropout", 0.0))
    by_hf = {p.hf: p for p in linear_slices(model)}
    for module, ab in sorted(lora.items()):
        if module not in by_hf:
            raise GptlabError(f"adapter targets {module}, which this {model.config.model_type} model has no Linear for")
        p = by_hf[module]
        layer = lora_layer_at(model, p.ours, dropout)
        start, stop = p.span
        A, B = ab["lora_A"], ab["lora_B"]
        if A.shape[1] != layer.in_features or B.shape != (stop - start, A.shape[0]):
            raise GptlabError(f"{path}: {module} has lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)}, which do "
                              f"not fit a ({stop - start} x {layer.in_features}) layer")
        k = layer.add_adapter(start, stop, A.shape[0], alpha, rslora, name=name)
        _fill(layer, k, p, A, B)
    if name is None:
        for pname, param in model.named_parameters():
            param.requires_grad_(is_lora_parameter(pname))
    return extras


def load_adapter_weights(model: nn.Module, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Refill the model's existing LoRA layers from an adapter dir (resuming, or restoring the best
    checkpoint); every adapter row must be in the file. Returns the other saved tensors, as load_adapter."""
    path = Path(path)
    layers = lora_layers(model)
    if not layers:
        raise GptlabError("this model has no LoRA layers to fill; use load_adapter")
    _, lora, extras = _read_adapter(path)
    filled = {(name, k): 0 for name, layer in layers.items() for k in range(len(layer.spans))}
    used = set()
    for p in linear_slices(model):
        layer = layers.get(p.ours)
        if layer is None or p.hf not in lora:
            continue
        start, stop = p.span
        k = next((k for k, (a, b) in enumerate(layer.spans) if a <= start and stop <= b), None)
        if k is None:
            raise GptlabError(f"{path}: {p.hf} has no adapter in this model")
        _fill(layer, k, p, lora[p.hf]["lora_A"], lora[p.hf]["lora_B"])
        filled[(p.ours, k)] += stop - start
        used.add(p.hf)
    short = [f"{n}[{k}]" for (n, k), rows in filled.items() if rows != layers[n].spans[k][1] - layers[n].spans[k][0]]
    if short or set(lora) - used:
        raise GptlabError(f"{path} does not match this model's LoRA layers "
                          f"(unfilled: {', '.join(short[:3]) or '-'}; unused: {', '.join(sorted(set(lora) - used)[:3]) or '-'})")
    return extras


@torch.no_grad()
def _fill(layer: LoRALinear, k: int, p: LinearSlice, A: torch.Tensor, B: torch.Tensor) -> None:
    """Copy one HF module's A and B into adapter k; B's rows go to our row order (GPT-NeoX interleave)."""
    start = layer.spans[k][0]
    if A.shape != layer.lora_A[k].shape:
        raise GptlabError(f"{p.hf}: lora_A is {tuple(A.shape)}, the model's adapter is {tuple(layer.lora_A[k].shape)}")
    layer.lora_A[k].copy_(A)
    layer.lora_B[k][torch.tensor(p.rows, device=layer.lora_B[k].device) - start] = B.to(layer.lora_B[k])
