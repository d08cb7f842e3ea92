"""gptlab's int8 / int4 model dirs: `gptlab export MODEL --format int8|int4 -o DIR` (or `gptlab.save` of a model
quantized by gptlab/models/quant.py); `gptlab.load(DIR)` reopens it as that quantized model, integers unchanged.

The dir is the family's HF layout (config.json, model.safetensors, tokenizer files), with three differences:

- model.safetensors: each quantized Linear's `<name>.weight` is replaced by `<name>.qweight` (int8 (N, K); int4:
  uint8 (N, K/2), two weights a byte) and `<name>.scales` (fp32: (N,), one per output channel; int4: (N, K/32),
  one per group of 32), named and split by the family's weight rows as the weight itself would be
  (gptlab/formats/weights.py). Everything else (embeddings, norms, biases, MoE experts and routers) is written
  as the family writes it, in the model's dtype (config.json `dtype`).
- config.json has a `quantization_config` block, which names the family and each quantized layer's scheme
  (gptlab's module names; under int4, a layer whose input width is not a multiple of 32 is int8):

      "model_type": "gptlab_int8",
      "quantization_config": {"quant_method": "gptlab", "format_version": 1, "bits": 8, "group_size": null,
                              "model_type": "gpt2", "modules": {"blocks.0.attn.qkv": "int8", ..., "lm_head": "int8"}}

- and the top-level model_type is `gptlab_int8` / `gptlab_int4`, not the family's. That is what makes other tools
  refuse the dir: transformers (5.25 here) only warns about a quant_method it does not know, then
  loads the float architecture with the integer layers missing, randomly initialised; a model_type it does not
  know stops AutoConfig / AutoModelForCausalLM with a ValueError naming `gptlab_int8` before any weight is read.

Other quantization_configs (GPTQ, AWQ, bitsandbytes, fp8, ...) are refused by name: gptlab reads only its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from gptlab.errors import GptlabError
from gptlab.models.config import Config
from gptlab.models.model import GPT
from gptlab.models.quant import GROUP, SCHEMES, QuantLinear

QUANT_METHOD = "gptlab"
FORMAT_VERSION = 1
BITS = {"int8": 8, "int4": 4}


@dataclass(frozen=True)
class Stored:
    """What a dir's quantization_config says: the scheme asked for, and each quantized layer's own."""

    scheme: str  # "int8" or "int4"
    model_type: str  # the family's HF model_type
    modules: dict[str, str]  # gptlab module name -> "int8" / "int4"


def dir_model_type(scheme: str) -> str:
    """config.json's top-level model_type for a dir of this scheme (a name no other tool knows)."""
    return f"gptlab_{scheme}"


def mark(hf_config: dict[str, Any], model: nn.Module) -> None:
    """Make the config.json dict of a model quantized by gptlab.models.quant say so (a float model: unchanged)."""
    modules = {name: m.kind for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not modules:
        return
    scheme = getattr(model, "quantization", None) or ("int4" if "int4" in modules.values() else "int8")
    hf_config["quantization_config"] = {
        "quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "bits": BITS[scheme],
        "group_size": GROUP if scheme == "int4" else None, "model_type": hf_config["model_type"], "modules": modules}
    hf_config["model_type"] = dir_model_type(scheme)


def read_block(raw: dict[str, Any], where: str) -> Stored | None:
    """The quantization_config of a config.json dict (`where` names the file in errors); None when it has none.
    The family's config.json is then `raw` with model_type set to `Stored.model_type`."""
    block = raw.get("quantization_config")
    if block is None:
        return None
    if not isinstance(block, dict):
        raise GptlabError(f"{where}: quantization_config is not an object")
    method = block.get("quant_method")
    if method != QUANT_METHOD:
        raise GptlabError(f"{where}: quantization_config quant_method={method!r} is not supported: gptlab loads "
                          f"float checkpoints and its own int8 / int4 dirs (quant_method {QUANT_METHOD!r}), not "
                          f"{method} weights")
    if block.get("format_version") != FORMAT_VERSION:
        raise GptlabError(f"{where}: gptlab quantization format_version={block.get('format_version')!r} is not one "
                          f"this gptlab reads ({FORMAT_VERSION}); was it written by a newer gptlab?")
    scheme = next((s for s, b in BITS.items() if b == block.get("bits")), None)
    group = GROUP if scheme == "int4" else None
    if scheme is None or block.get("group_size") != group:
        raise GptlabError(f"{where}: quantization_config bits={block.get('bits')!r}, group_size="
                          f"{block.get('group_size')!r} is neither int8 (8, null) nor int4 (4, {GROUP})")
    family = block.get("model_type")
    if not isinstance(family, str) or raw.get("model_type") not in (dir_model_type(scheme), family):
        raise GptlabError(f"{where}: quantization_config model_type={family!r} does not go with model_type="
                          f"{raw.get('model_type')!r} (expected {dir_model_type(scheme)!r}); the file was edited or "
                          f"damaged")
    allowed = SCHEMES if scheme == "int4" else ("int8",)  # int4 falls back to int8 for odd input widths
    modules = block.get("modules")
    if not isinstance(modules, dict) or not modules or any(
            not isinstance(k, str) or v not in allowed for k, v in modules.items()):
        raise GptlabError(f"{where}: quantization_config modules must map layer names to "
                          f"{' / '.join(repr(a) for a in allowed)}")
    return Stored(scheme, family, dict(modules))


def stored_in(model_dir) -> Stored | None:
    """read_block of a model dir's config.json (None when the dir has none, or no quantization_config)."""
    from pathlib import Path

    from gptlab.formats.files import read_json

    f = Path(model_dir) / "config.json"
    return read_block(read_json(f), str(f)) if f.is_file() else None


def prepare(model: nn.Module, stored: Stored, where: str) -> set[str]:
    """Swap each layer `stored` names in a model on the meta device for an empty QuantLinear of its scheme, as
    gptlab.models.quant.quantize would; returns the state-dict names of their integers and scales, which are
    loaded in their own dtypes."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    integers = set()
    for name, kind in stored.modules.items():
        linear = linears.get(name)
        if linear is None:
            raise GptlabError(f"{where}: quantization_config names {name!r}, which is not a linear layer of this "
                              f"{model.config.model_type} model")
        if kind == "int4" and linear.in_features % GROUP:
            raise GptlabError(f"{where}: quantization_config makes {name} int4, but its input width "
                              f"{linear.in_features} is not a multiple of {GROUP}")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, QuantLinear(linear, kind))  # meta: shapes only
        integers |= {f"{name}.qweight", f"{name}.scales"}
    model.quantization = stored.scheme
    return integers


def weight_bytes(config: Config, stored: Stored, dtype: torch.dtype) -> int:
    """Bytes of the weights a dir of this config and quantization holds (integers, scales, and the float rest in
    `dtype`), counted on a model built on the meta device."""
    with torch.device("meta"):
        model = GPT(config)
    integers = prepare(model, stored, "quantization_config")
    state = model.state_dict()
    if config.tie_embeddings and "lm_head.weight" in state:
        del state["lm_head.weight"]  # the embedding, stored once
    size = torch.empty((), dtype=dtype).element_size()
    return sum(t.numel() * (t.element_size() if name in integers else size) for name, t in state.items())
