"""What a model-family module (gptlab/formats/families/*.py) declares: one `Family` per HF `model_type`.

A Family is data, read by the loader, the saver, the LoRA adapter export and the tests alike:

- `weights`: `WeightRow`s, each naming one of our parameters and the HF tensors joined into it;
- `config`: codecs, each translating some Config fields to config.json keys and back. Reading and writing
  come from the same entry, so the two directions cannot disagree;
- `causal_lm` / `sequence_classifier`: the transformers classes written to config.json "architectures".

Codecs run in order; `read(hf, ours)` adds our fields to the dict `ours` (and may look at fields read
before it), `write(config, out)` adds config.json keys to `out`. Family-specific codecs (GPT-Neo's local
layers, Qwen's sliding windows) live in their family's module.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from gptlab.errors import GptlabError
from gptlab.models.config import Config

REQUIRED = object()  # a Key without a default: config.json must have it


# ---------------------------------------------------------------------------------------------------------
# weight rows


@dataclass(frozen=True)
class WeightRow:
    """One of our parameters and the HF tensors it is made of."""

    ours: str  # our parameter name; "{i}" is the layer
    hf: tuple[str, ...]  # HF names joined in this order along dim 0 (dim 1 for stacked experts); "{e}" = expert
    transpose: bool = False  # GPT-1/GPT-2 Conv1D stores weights as (in, out)
    qkv_per_head: bool = False  # GPT-NeoX fuses q, k, v per head: rows (nh, 3, hs) instead of (3, nh, hs)
    per_expert: bool = False  # HF stores one tensor per expert; ours stacks them into (E, ...)


def weight_and_bias(ours: str, hf: str | tuple[str, ...], **kw: Any) -> list[WeightRow]:
    """The `.weight` and `.bias` rows of one module (a bias our config leaves out is skipped at load)."""
    hf = (hf,) if isinstance(hf, str) else hf
    return [WeightRow(f"{ours}.{p}", tuple(f"{h}.{p}" for h in hf), **kw) for p in ("weight", "bias")]


# ---------------------------------------------------------------------------------------------------------
# config.json codecs


class HFConfig:
    """An HF config.json dict being read: lookups with defaults, and errors that name the family."""

    def __init__(self, d: dict[str, Any], model_type: str) -> None:
        self.d, self.model_type = d, model_type

    def get(self, key: str, default: Any = None) -> Any:
        v = self.d.get(key, default)
        return default if v is None else v

    def need(self, key: str) -> Any:
        if self.d.get(key) is None:
            raise GptlabError(f"config.json ({self.model_type}) lacks the required field {key!r}")
        return self.d[key]


class Codec(Protocol):
    def read(self, hf: HFConfig, ours: dict[str, Any]) -> None: ...

    def write(self, config: Config, out: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class Key:
    """Config field(s) `ours` <-> the config.json key `hf`.

    default: used when the key is absent or null (REQUIRED: an error; a callable: computed from the
      HFConfig and the fields read so far). older: other spellings read when `hf` is absent.
    values: HF value -> ours (e.g. activation names); writing uses the first HF value listed for ours.
    A tuple of fields takes one value (GPT-NeoX's attention_bias sets both biases); it is written from the
    first, and the saver's round-trip check refuses a config whose fields differ.
    """

    ours: str | tuple[str, ...]
    hf: str
    default: Any = REQUIRED
    older: tuple[str, ...] = ()
    values: dict[Any, Any] | None = None

    @property
    def fields(self) -> tuple[str, ...]:
        return (self.ours,) if isinstance(self.ours, str) else self.ours

    def read(self, hf: HFConfig, ours: dict[str, Any]) -> None:
        key = next((k for k in (self.hf, *self.older) if hf.d.get(k) is not None), None)
        if key is None:
            if self.default is REQUIRED:
                hf.need(self.hf)
            value = self.default(hf, ours) if callable(self.default) else self.default
        else:
            value = hf.d[key]
            if self.values is not None:
                if value not in self.values:
                    raise GptlabError(f"config.json field {key}={value!r} is not supported "
                                      f"(supported: {sorted(self.values)})")
                value = self.values[value]
        for name in self.fields:
            ours[name] = value

    def write(self, config: Config, out: dict[str, Any]) -> None:
        value = getattr(config, self.fields[0])
        if self.values is not None:
            back = next((h for h, o in self.values.items() if o == value), REQUIRED)
            if back is REQUIRED:
                raise GptlabError(f"this config cannot be saved as an HF {out['model_type']} checkpoint: "
                                  f"{self.fields[0]}={value!r} has no {self.hf} value in that family")
            value = back
        out[self.hf] = value


@dataclass(frozen=True)
class Fixed:
    """A Config field every checkpoint of the family has the same value of (nothing in config.json)."""

    ours: str
    value: Any

    def read(self, hf: HFConfig, ours: dict[str, Any]) -> None:
        ours[self.ours] = self.value

    def write(self, config: Config, out: dict[str, Any]) -> None:
        pass  # the saver's round-trip check refuses a config whose field differs


@dataclass(frozen=True)
class Refuse:
    """A config.json key whose values other than the plain one gptlab does not implement."""

    hf: str
    ok: Callable[[Any], bool]
    why: str

    def read(self, hf: HFConfig, ours: dict[str, Any]) -> None:
        if self.hf in hf.d and not self.ok(hf.d[self.hf]):
            raise GptlabError(f"config.json field {self.hf}={hf.d[self.hf]!r} is not supported: {self.why}")

    def write(self, config: Config, out: dict[str, Any]) -> None:
        pass


ROPE_SCALINGS = ("default", "linear", "dynamic", "yarn")


@dataclass(frozen=True)
class Rope:
    """rope_theta, the rotary fraction and rotary scaling, from transformers 5's `rope_parameters` or the
    older `rope_scaling` + flat keys (transformers reads `rope_scaling` first when both are there).

    Scaling (linear, dynamic, yarn) extends the context: our context_length is the extended one, as vLLM
    derives it (linear / dynamic: factor x max_position_embeddings, which is also dynamic's original
    context; yarn: factor x original_max_position_embeddings, or max_position_embeddings when larger). Other
    rope types are refused, naming the field.

    fraction_key: the older key of the rotary fraction (GPT-NeoX's rotary_pct); None when the family's
      rotary fraction is not read here (Qwen rotates whole heads; GPT-J counts rotary_dim).
    parameters: also write `rope_parameters`, as transformers 5 does for this family.
    """

    theta_key: str = "rope_theta"
    fraction_key: str | None = None
    parameters: bool = True
    whole_heads: bool = False  # refuse a partial_rotary_factor other than 1 (the family has none)
    context_key: str = "max_position_embeddings"
    scalings: tuple[str, ...] = ROPE_SCALINGS  # the rope types transformers implements for the family

    def read(self, hf: HFConfig, ours: dict[str, Any]) -> None:
        params = hf.d.get("rope_parameters") or {}
        spec = hf.d.get("rope_scaling") or params
        field = "rope_scaling" if hf.d.get("rope_scaling") else "rope_parameters"
        kind = spec.get("rope_type") or spec.get("type") or "default"
        if kind not in self.scalings:
            raise GptlabError(f"config.json {field} rope_type={kind!r} is not supported for {hf.model_type} "
                              f"(supported: {', '.join(self.scalings)})")
        theta = spec.get("rope_theta", params.get("rope_theta", hf.get(self.theta_key, 10000.0)))
        ours["rope_theta"] = float(theta)
        fraction = spec.get("partial_rotary_factor", params.get("partial_rotary_factor"))
        if self.fraction_key is not None:
            ours["rotary_fraction"] = fraction if fraction is not None else hf.get(self.fraction_key, 1.0)
        elif self.whole_heads and fraction not in (None, 1.0):
            raise GptlabError(f"config.json partial_rotary_factor={fraction} is not supported for {hf.model_type}")
        ours["rope_scaling"] = kind
        if kind != "default":
            self._read_scaling(hf, spec, field, kind, ours)

    @staticmethod
    def _read_scaling(hf: HFConfig, spec: dict[str, Any], field: str, kind: str, ours: dict[str, Any]) -> None:
        context = ours["context_length"]
        original = context
        if kind == "yarn":
            original = int(spec.get("original_max_position_embeddings")
                           or hf.get("original_max_position_embeddings", context))
        factor = spec.get("factor")
        if factor is None and kind == "yarn":
            factor = context / original
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not factor >= 1:
            raise GptlabError(f"config.json {field} needs a number factor >= 1 for rope_type={kind!r}, got {factor!r}")
        ours.update(rope_factor=float(factor), rope_original_context=original,
                    context_length=max(context if kind == "yarn" else 0, int(factor * original)))
        if kind == "yarn":
            attention = spec.get("attention_factor")
            if attention is None:
                def mscale(m: float = 1.0) -> float:
                    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0
                m, m_all = spec.get("mscale"), spec.get("mscale_all_dim")
                attention = mscale(m) / mscale(m_all) if m and m_all else mscale()
            ours.update(rope_attention_factor=float(attention), rope_beta_fast=float(spec.get("beta_fast") or 32),
                        rope_beta_slow=float(spec.get("beta_slow") or 1), rope_truncate=bool(spec.get("truncate", True)))

    def write(self, config: Config, out: dict[str, Any]) -> None:
        out[self.theta_key] = config.rope_theta
        if self.fraction_key is not None:
            out[self.fraction_key] = config.rotary_fraction
        params: dict[str, Any] = {"rope_type": config.rope_scaling, "rope_theta": config.rope_theta}
        if self.fraction_key is not None:
            params["partial_rotary_factor"] = config.rotary_fraction
        if config.rope_scaling != "default":
            params["factor"] = config.rope_factor
            if config.rope_scaling == "yarn":
                params.update(original_max_position_embeddings=config.rope_original,
                              attention_factor=config.rope_attention_factor, beta_fast=config.rope_beta_fast,
                              beta_slow=config.rope_beta_slow)
                if not config.rope_truncate:
                    params["truncate"] = False
            else:  # transformers takes the original context of linear / dynamic scaling from max_position_embeddings
                out[self.context_key] = config.rope_original
            out["rope_scaling"] = dict(params)  # what transformers 4 reads (and 5 reads first)
        if self.parameters:
            out["rope_parameters"] = params


def keys(**spec: str | tuple[str, Any]) -> tuple[Key, ...]:
    """Keys from `field="hf_key"` (required) or `field=("hf_key", default)` pairs, in order."""
    return tuple(Key(f, v) if isinstance(v, str) else Key(f, v[0], v[1]) for f, v in spec.items())


def fixed(**values: Any) -> tuple[Fixed, ...]:
    """Fixed codecs from `field=value` pairs."""
    return tuple(Fixed(f, v) for f, v in values.items())


# HF activation names -> ours; the first name listed for each of ours is the one written
ACTIVATIONS = {"gelu_new": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu", "relu2": "relu2",
               "gelu_pytorch_tanh": "gelu_new",
               "gelu_fast": "gelu_new", "swish": "silu"}


# ---------------------------------------------------------------------------------------------------------
# the family


@dataclass(frozen=True)
class GGUFSpec:
    """How llama.cpp names and runs a family (gptlab/formats/gguf_export.py writes it), read from its loader and
    graph for `arch` (src/models/<arch>.cpp in llama.cpp).

    tensors: for each of our weights (state-dict names, {i} the block) the GGUF tensor names, listing what
      llama.cpp's loader reads for the arch: a `.weight` listed is required, a bias is written when the model
      has it. Two or three names split the weight's output rows: three are q, k and v (by heads), two are halves
      (a GLU's gate and up; stacked experts (E, 2I, C) split per expert).
    requires: Config fields and the values llama.cpp's graph computes for the arch; a model with another value
      is refused, naming the field, rather than written as a file that runs something else.
    head_required: the loader reads output.weight even when the head is tied: a copy of the embedding is written.
    biases_required: the loader reads every bias of `tensors`: a model without them gets zeros (the same sums).
    hparams: writes the arch's own metadata keys (GGUFWriter, Config), e.g. the expert counts.
    """

    arch: str
    tensors: tuple[tuple[str, tuple[str, ...]], ...]
    requires: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    head_required: bool = False
    biases_required: bool = False
    hparams: Callable[[Any, Config], None] | None = None


def gguf_weight_and_bias(ours: str, theirs: str | tuple[str, ...]) -> list[tuple[str, tuple[str, ...]]]:
    """GGUFSpec rows for a module's `.weight` and `.bias` (several GGUF names: its rows split)."""
    theirs = (theirs,) if isinstance(theirs, str) else theirs
    return [(f"{ours}.{p}", tuple(f"{t}.{p}" for t in theirs)) for p in ("weight", "bias")]


def gguf_fused_block_rows() -> list[tuple[str, tuple[str, ...]]]:
    """GGUFSpec rows of a model with biased LayerNorms, one fused qkv and a two-layer MLP (llama.cpp's gpt2 and
    gptneox graphs name them alike): every block, the final norm and the head; embeddings are the caller's."""
    rows = [("blocks.{i}.norm_1", "blk.{i}.attn_norm"), ("blocks.{i}.attn.qkv", "blk.{i}.attn_qkv"),
            ("blocks.{i}.attn.proj", "blk.{i}.attn_output"), ("blocks.{i}.norm_2", "blk.{i}.ffn_norm"),
            ("blocks.{i}.mlp.fc", "blk.{i}.ffn_up"), ("blocks.{i}.mlp.proj", "blk.{i}.ffn_down"),
            ("norm_f", "output_norm")]
    return [row for ours, theirs in rows for row in gguf_weight_and_bias(ours, theirs)] + [
        ("lm_head.weight", ("output.weight",))]


@dataclass(frozen=True)
class Family:
    model_type: str  # HF config.json "model_type"
    causal_lm: str  # transformers class of a language model ("architectures" in config.json)
    sequence_classifier: str  # transformers class of a sequence classifier (a score head on the last token)
    weights: tuple[WeightRow, ...]
    config: tuple[Codec, ...]
    gguf: GGUFSpec | None = None  # llama.cpp's names, for `gptlab export --format gguf` (None: not supported)
