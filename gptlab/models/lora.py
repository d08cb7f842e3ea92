"""LoRA (Hu et al. 2021) as one module swap: `apply_lora(model, targets)` replaces chosen nn.Linear layers
with `LoRALinear`, which adds scale * B @ A to some rows of the frozen weight.

Targets are named as Hugging Face names them (`c_attn`, `q_proj`, `v_proj`, `gate_proj`, ...) or as gptlab
does (`qkv`, `attn.proj`, `mlp.fc`, ...); `all-linear` takes every Linear but the output head. Our attention
fuses q, k and v into one `qkv` Linear (rows [q; k; v]) and GLU MLPs fuse gate and up into `fc`, so a LoRA on
HF's `q_proj` is a LoRA on the q rows of our `qkv`. Which rows belong to which HF module is read from hf.py's
weight maps (the same tables the loader and saver use), never from a model's name.

Adapters are saved in PEFT's layout (adapter_config.json + adapter_model.safetensors, keys such as
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), so `peft.PeftModel.from_pretrained` and
vLLM load them, and PEFT adapters load here. A LoRA on a whole fused layer (our `qkv` on a Qwen model) is
exported exactly as one LoRA per HF module sharing A, with B split by rows: B @ A restricted to the q rows is
B[q] @ A.

GPT-1/GPT-2 store weights as Conv1D (in, out); PEFT keeps lora_A (r, in) and lora_B (out, r) as for a
Linear and only transposes the merged delta (`fan_in_fan_out`), so the tensors need no transposition here,
only the flag in adapter_config.json.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab.errors import GptlabError
from gptlab.model import Linear, linear

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


# ---------------------------------------------------------------------------------------------------------
# the layer


class LoRALinear(nn.Linear):
    """A Linear plus low-rank updates: y = x W^T + b + sum_k pad_k(scale_k * dropout(x) A_k^T B_k^T).

    Adapter k writes output rows [start_k, stop_k); it shares the base layer's weight and bias Parameters
    (so state-dict names stay `...qkv.weight` and hf.save still finds them). Adapters are kept in fp32 when
    the base is half precision (PEFT's autocast_adapter_dtype), so small updates are not rounded away.
    """

    def __init__(self, base: nn.Linear, dropout: float = 0.0) -> None:
        w = base.weight
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta", dtype=w.dtype)
        self.weight = base.weight
        self.bias = base.bias
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        self.spans: list[tuple[int, int]] = []
        self.scales: list[float] = []
        self.alphas: list[float] = []
        self.lora_dropout = nn.Dropout(dropout)
        self.merged = False

    def add_adapter(self, start: int, stop: int, r: int, alpha: float, rslora: bool = False) -> int:
        """A new adapter on output rows [start, stop), initialised as PEFT does (A Kaiming-uniform, B = 0)."""
        if self.merged:
            raise GptlabError("unmerge the LoRA weights before adding an adapter")
        w = self.weight
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        A = torch.empty(r, self.in_features, device=w.device, dtype=dtype)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # PEFT's init_lora_weights=True (nn.Linear's own init)
        B = torch.zeros(stop - start, r, device=w.device, dtype=dtype)  # the update starts at zero
        self.lora_A.append(nn.Parameter(A))
        self.lora_B.append(nn.Parameter(B))
        self.spans.append((start, stop))
        self.alphas.append(float(alpha))
        self.scales.append(alpha / math.sqrt(r) if rslora else alpha / r)  # rsLoRA: Kalajdzievski 2023
        return len(self.spans) - 1

    def delta(self, k: int) -> torch.Tensor:
        """scale * B @ A for adapter k, in fp32: (stop - start, in)."""
        return self.scales[k] * (self.lora_B[k].float() @ self.lora_A[k].float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.bias)
        if self.merged or not self.spans:
            return y
        h = self.lora_dropout(x)
        for A, B, (start, stop), scale in zip(self.lora_A, self.lora_B, self.spans, self.scales):
            d = F.linear(F.linear(h.to(A.dtype), A) * scale, B).to(y.dtype)  # scaled at rank r: cheaper
            y = y + (d if stop - start == self.out_features else F.pad(d, (start, self.out_features - stop)))
        return y

    @torch.no_grad()
    def merge(self) -> None:
        """Fold every adapter into the weight; a second call is a no-op."""
        if self.merged:
            return
        for k, (start, stop) in enumerate(self.spans):
            self.weight[start:stop] += self.delta(k).to(self.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the adapters back out of the weight (exact in fp32, rounded in half precision)."""
        if not self.merged:
            return
        for k, (start, stop) in enumerate(self.spans):
            self.weight[start:stop] -= self.delta(k).to(self.weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        spans = ", ".join(f"rows {a}:{b} r={A.shape[0]}" for (a, b), A in zip(self.spans, self.lora_A))
        return f"{super().extra_repr()}, lora=[{spans}], merged={self.merged}"


# ---------------------------------------------------------------------------------------------------------
# which rows of which of our Linears each HF module is


@dataclass(frozen=True)
class Piece:
    """One HF Linear module as a part of one of ours."""

    ours: str  # our module path, e.g. "blocks.0.attn.qkv"
    hf: str  # the HF module path, e.g. "model.layers.0.self_attn.q_proj"
    rows: tuple[int, ...]  # our output rows, in the HF module's row order
    transposed: bool  # HF stores it as Conv1D (in, out): PEFT's fan_in_fan_out

    @property
    def span(self) -> tuple[int, int]:
        return min(self.rows), max(self.rows) + 1


def pieces(model: nn.Module) -> list[Piece]:
    """Every HF Linear module of `model`'s family with the rows of our Linear it maps to.

    Derived by pushing row indices through hf.ours_to_hf: an index column for each of our Linear weights
    comes out split (q/k/v, gate/up), reordered (GPT-NeoX's per-head interleave) and transposed exactly as
    the weights would be, so the tables in hf.py stay the one source of truth.
    """
    from gptlab.hf import expand_map, ours_to_hf

    config = model.config
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if config.tie_embeddings:
        linears.pop("lm_head", None)  # a LoRA on a tied head would also move the input embedding
    index = {f"{n}.weight": torch.arange(m.out_features)[:, None] for n, m in linears.items()}
    source, transposed = {}, {}
    for name, groups, row in expand_map(config, set(index)):
        transposed[name] = row.transpose
        source.update({h: name for group in groups for h in group})
    return [
        Piece(source[h].removesuffix(".weight"), h.removesuffix(".weight"), tuple(t.flatten().tolist()),
              transposed[source[h]])
        for h, t in ours_to_hf(config, index).items()
    ]


def _matches(path: str, target: str) -> bool:
    # PEFT's rule for target_modules entries: the full name, or a suffix after a dot
    return path == target or path.endswith("." + target)


def _resolve(model: nn.Module, targets: list[str] | tuple[str, ...] | str) -> dict[str, list[tuple[int, int]]]:
    """{our module: [row spans]} for `targets` (HF names, our names, or "all-linear")."""
    if isinstance(targets, str):
        targets = [targets]
    ps = pieces(model)
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


# ---------------------------------------------------------------------------------------------------------
# apply, freeze, merge


def apply_lora(
    model: nn.Module,
    targets: list[str] | tuple[str, ...] | str = ("qkv",),
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    rslora: bool = False,
) -> nn.Module:
    """Swap the targeted nn.Linear layers of a gptlab GPT for LoRALinear and freeze everything else.

    targets: HF module names (c_attn, q_proj, v_proj, gate_proj, ...), gptlab names (qkv, attn.proj,
      mlp.fc, ...) or "all-linear"; matched as PEFT matches target_modules (whole name or dotted suffix).
    r, alpha: rank and scale alpha / r (alpha / sqrt(r) with rslora); dropout: on the adapter's input.
    Returns the same model, changed in place; afterwards only LoRA parameters require grad.
    """
    if r < 1:
        raise GptlabError(f"LoRA rank r must be at least 1, got {r}")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise GptlabError("this model already has LoRA layers")
    plan = _resolve(model, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, spans in plan.items():
        layer = _swap(model, name, dropout)
        for start, stop in spans:
            layer.add_adapter(start, stop, r, alpha, rslora)
    return model


def _swap(model: nn.Module, name: str, dropout: float) -> LoRALinear:
    layer = model.get_submodule(name)
    if isinstance(layer, LoRALinear):
        return layer
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    new = LoRALinear(layer, dropout)
    setattr(parent, leaf, new)
    return new


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def is_lora_parameter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, under our own names (what a LoRA training checkpoint needs)."""
    return {k: v for k, v in model.state_dict().items() if is_lora_parameter(k)}


def merge_lora(model: nn.Module) -> nn.Module:
    """W += scale * B @ A in every LoRA layer; idempotent. Forward passes then skip the adapters."""
    for layer in lora_layers(model).values():
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model


def unload_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Put plain nn.Linear layers back (merged first unless merge=False): a standard model for hf.save."""
    for name, layer in lora_layers(model).items():
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        plain = Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        plain.weight, plain.bias = layer.weight, layer.bias
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, plain)
    return model


# ---------------------------------------------------------------------------------------------------------
# PEFT-format adapters


def peft_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors with PEFT key names, LoRA fields of adapter_config.json) for the model's adapters."""
    layers = lora_layers(model)
    if not layers:
        raise GptlabError("this model has no LoRA layers to save")
    tensors: dict[str, torch.Tensor] = {}
    leaves, flips, ranks, alphas, drops = set(), set(), set(), set(), set()
    for p in pieces(model):
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

    from gptlab.hf import staged_dir

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
    try:
        cfg = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GptlabError(f"{f} is not valid JSON: {e}") from None
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


def load_adapter(model: nn.Module, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Attach a PEFT LoRA adapter (gptlab- or PEFT-saved) to a gptlab GPT without LoRA layers; one adapter per
    HF module in the file. Returns the other saved tensors (modules_to_save, e.g. {"score.weight": ...})."""
    path = Path(path)
    if lora_layers(model):
        raise GptlabError("this model already has LoRA layers; use load_adapter_weights to refill them")
    cfg, lora, extras = _read_adapter(path)
    alpha, rslora = float(cfg["lora_alpha"]), bool(cfg.get("use_rslora", False))
    dropout = float(cfg.get("lora_dropout", 0.0))
    by_hf = {p.hf: p for p in pieces(model)}
    for module, ab in sorted(lora.items()):
        if module not in by_hf:
            raise GptlabError(f"adapter targets {module}, which this {model.config.model_type} model has no Linear for")
        p = by_hf[module]
        layer = _swap(model, p.ours, dropout)
        start, stop = p.span
        A, B = ab["lora_A"], ab["lora_B"]
        if A.shape[1] != layer.in_features or B.shape != (stop - start, A.shape[0]):
            raise GptlabError(f"{path}: {module} has lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)}, which do "
                              f"not fit a ({stop - start} x {layer.in_features}) layer")
        k = layer.add_adapter(start, stop, A.shape[0], alpha, rslora)
        _fill(layer, k, p, A, B)
    for name, param in model.named_parameters():
        param.requires_grad_(is_lora_parameter(name))
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
    for p in pieces(model):
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
def _fill(layer: LoRALinear, k: int, p: Piece, A: torch.Tensor, B: torch.Tensor) -> None:
    """Copy one HF module's A and B into adapter k; B's rows go to our row order (GPT-NeoX interleave)."""
    start = layer.spans[k][0]
    if A.shape != layer.lora_A[k].shape:
        raise GptlabError(f"{p.hf}: lora_A is {tuple(A.shape)}, the model's adapter is {tuple(layer.lora_A[k].shape)}")
    layer.lora_A[k].copy_(A)
    layer.lora_B[k][torch.tensor(p.rows, device=layer.lora_B[k].device) - start] = B.to(layer.lora_B[k])
