"""Hugging Face model dirs in and out: find one (a local dir or a hub id), load it into a `GPT`, save one.

A model dir is config.json (translated by gptlab/formats/hfconfig.py) + model.safetensors or shards (named
by gptlab/formats/weights.py from the family's rows) + tokenizer files; an int8 / int4 dir adds a
quantization_config and stores integers (gptlab/formats/quantized.py). Weights are read with safetensors
only: pickled .bin/.pt files are refused, never unpickled. A sequence classifier is the same dir plus
`score.weight` and the label fields transformers' AutoModelForSequenceClassification reads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from gptlab.dtypes import parse_device, parse_dtype
from gptlab.errors import GptlabError, reason
from gptlab.formats import families, quantized
from gptlab.formats.files import read_json, staged_dir
from gptlab.formats.hfconfig import config_from_hf, config_to_hf
from gptlab.formats.weights import hf_to_ours, our_names, ours_to_hf
from gptlab.models.classifier import SequenceClassifier
from gptlab.models.config import Config
from gptlab.models.model import GPT

# ---------------------------------------------------------------------------------------------------------
# finding, loading and saving a model dir

HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]  # a whole model, weights as safetensors
HUB_CONFIG_PATTERNS = ["config.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                       "model.safetensors.index.json"]  # what describes a model, without its weights


def hub_snapshot(repo_id: str, patterns: list[str], what: str = "downloading") -> Path:
    """The files of a hub repo matching `patterns`, fetched by huggingface_hub (or from its cache)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=repo_id, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated repo: all end the same way for the user
        raise GptlabError(
            f"no local directory {repo_id!r}, and {what} {repo_id!r} from the Hugging Face Hub failed ({reason(e)}); "
            f"download it where you have network access and pass the local directory instead"
        ) from None


def looks_like_path(s: str) -> bool:
    """A string that names a local path, never a hub id (org/name)."""
    return s.startswith((".", "/", "~")) or s.count("/") > 1 or os.sep != "/" and os.sep in s


def resolve(path_or_id: str | os.PathLike, patterns: list[str] | None = None) -> Path:
    """A local model dir, or a hub id downloaded through huggingface_hub (weights as safetensors only)."""
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        return p
    s = str(path_or_id)
    if p.exists():
        raise GptlabError(f"{s} is a file; pass the model directory that holds config.json")
    if looks_like_path(s):
        raise GptlabError(f"model directory {s} does not exist")
    return hub_snapshot(s, patterns or HUB_PATTERNS)


def read_config(path: Path) -> Config:
    f = path / "config.json"
    if not f.is_file():
        raise GptlabError(f"{path} has no config.json; is it a Hugging Face-format model directory?")
    raw = read_json(f)
    stored = quantized.read_block(raw, str(f))  # an int8 / int4 dir names its family in its quantization_config
    return config_from_hf(raw if stored is None else {**raw, "model_type": stored.model_type})


def _weight_files(path: Path) -> list[Path]:
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise GptlabError(f"{index} is malformed: no weight_map of tensor name -> file")
        names = sorted(set(weight_map.values()))
        files = [path / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise GptlabError(f"shard(s) listed in {index.name} are missing: {', '.join(missing)}")
        return files
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise GptlabError(f"{path} holds only pickled weights (.bin/.pt); gptlab loads safetensors only (convert them first)")
    raise GptlabError(f"{path} has no model.safetensors")


def load(
    path_or_id: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    quantize: str | None = None,
):
    """Load an HF-format model dir (or hub id) into a gptlab `GPT`, in eval mode.

    dtype: None keeps the checkpoint's dtype (config.json `dtype`/`torch_dtype`, fp32 when absent).
    quantize: "int8" or "int4" turns the linear layers' weights into integers for inference
    (gptlab/models/quant.py); activations keep `dtype`.

    An int8 / int4 dir (gptlab/formats/quantized.py) opens as that quantized model, in its own dtype; quantize=
    its own scheme is a no-op (the integers are already what was asked), another scheme is refused.
    """
    model = load_with_extras(path_or_id, dtype, device)[0]
    stored = getattr(model, "quantization", None)
    if quantize and stored and quantize != stored:
        raise GptlabError(f"{model.source} already holds {stored} weights; making them {quantize} would round the "
                          f"rounded values again: quantize the original model instead")
    if quantize and not stored:
        from gptlab.models.quant import quantize as to_integers

        to_integers(model, quantize)
    return model


def load_with_extras(
    path_or_id: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    extras: tuple[str, ...] = (),
    head_optional: bool = False,
) -> tuple:
    """`load`, plus the named non-GPT tensors of the checkpoint (e.g. a classifier's `score.weight`), returned
    as {name: tensor} in the model's dtype and device; each must be present.

    head_optional: an untied checkpoint without lm_head.weight (transformers' *ForSequenceClassification
    saves none) gets a zero head instead of an error.
    """
    from safetensors import SafetensorError, safe_open

    path = resolve(path_or_id)
    config = read_config(path)
    raw = read_json(path / "config.json")
    stored = quantized.read_block(raw, f"{path}/config.json")
    saved_dtype = parse_dtype(raw.get("dtype") or raw.get("torch_dtype") or "float32")
    if stored is not None and dtype is not None and parse_dtype(dtype) != saved_dtype:
        raise GptlabError(f"{path} holds {stored.scheme} weights with {str(saved_dtype).removeprefix('torch.')} "
                          f"embeddings, norms and activations, and loads only as that dtype, for inference; to use "
                          f"another dtype, or to train, start from the original model")
    dtype = parse_dtype(dtype) if dtype is not None else saved_dtype
    device = parse_device(device)
    files = _weight_files(path)

    with torch.device("meta"):
        model = GPT(config)
    integers = quantized.prepare(model, stored, f"{path}/config.json") if stored is not None else set()
    tensors: dict[str, torch.Tensor] = {}
    try:
        for f in files:
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                for k in sf.keys():
                    tensors[k] = sf.get_tensor(k)
    except (SafetensorError, OSError, ValueError) as e:
        raise GptlabError(f"could not read {f}: {e} (truncated or not a safetensors file?)") from None

    found = {}
    for name in extras:
        if name not in tensors:
            raise GptlabError(f"{path} has no {name}: not a checkpoint of that kind (a plain language model?)")
        found[name] = tensors.pop(name).to(device=device, dtype=dtype)
    if head_optional and not config.tie_embeddings and "lm_head.weight" not in tensors:
        tensors["lm_head.weight"] = torch.zeros(config.vocab_size, config.n_embd)

    def get(name: str) -> torch.Tensor:
        if name not in tensors:
            if stored is None and name.endswith(".weight") and name.removesuffix("weight") + "qweight" in tensors:
                raise GptlabError(f"{path} holds integer weights ({name.removesuffix('weight')}qweight) but its "
                                  f"config.json has no quantization_config saying how to read them")
            raise GptlabError(f"{path} lacks weight {name!r} that its config.json ({config.model_type}) requires")
        return tensors.pop(name)

    ours = our_names(model)
    sd = hf_to_ours(config, ours, get)
    expected = model.state_dict()
    for name, t in sd.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise GptlabError(
                f"weight shape mismatch for {name}: checkpoint has {tuple(t.shape)}, config.json implies "
                f"{tuple(expected[name].shape)}"
            )
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):  # a diverged run's weights, or damage
            raise GptlabError(f"{path}: weight {name} holds NaN or infinite values; the checkpoint is damaged "
                              f"(saved from a run that diverged?) and would generate nothing meaningful")
        if name in integers:  # int8 / uint8 nibbles and fp32 scales: as stored, bit for bit
            if t.dtype != expected[name].dtype:
                raise GptlabError(f"{path}: {name} is {t.dtype}, not the {expected[name].dtype} its "
                                  f"quantization_config implies; the checkpoint is damaged")
            sd[name] = t.to(device=device).contiguous()
            continue
        # contiguous (out, in) rows for every family: GPT-2's Conv1D (in, out) views are copied once here,
        # since row-major weights are what the decode kernels stream fastest (gptlab/kernels)
        sd[name] = t.to(device=device, dtype=dtype).contiguous()
    leftover = [k for k in tensors if not k.endswith(("attn.bias", "attn.masked_bias", "rotary_emb.inv_freq"))]
    if leftover and not (config.tie_embeddings and leftover == ["lm_head.weight"]):
        raise GptlabError(f"{path} has weights gptlab does not expect for {config.model_type}: {', '.join(leftover[:5])}")
    model.load_state_dict(sd, strict=False, assign=True)
    if config.tie_embeddings and "lm_head.qweight" not in integers:  # a quantized head keeps its own integers
        model.lm_head.weight = model.wte.weight
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise GptlabError(f"{path} does not provide {', '.join(missing[:5])}")
    model.init_buffers(device=device)
    model.source = str(path)
    if stored is not None:
        model.requires_grad_(False)  # as gptlab.models.quant.quantize leaves it: for inference
    return model.eval(), found


def save(
    model,
    path: str | os.PathLike,
    tokenizer=None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    extra_config: dict[str, Any] | None = None,
) -> Path:
    """Write config.json + model.safetensors (+ tokenizer files); atomically replaces an existing dir.

    extra_tensors / extra_config: added to the checkpoint as they are (HF names), e.g. a classification
    head's `score.weight` with `architectures` and `id2label`.
    """
    from safetensors.torch import save_file

    config = model.config
    path = Path(path)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    dtype = model.wte.weight.dtype
    hf_config = config_to_hf(config, dtype)
    quantized.mark(hf_config, model)  # int8 / int4 layers: their integers are saved, and config.json says so
    tensors = {k: v.to("cpu").contiguous() for k, v in ours_to_hf(config, state).items()}
    tensors.update({k: v.detach().to("cpu").contiguous() for k, v in (extra_tensors or {}).items()})
    hf_config.update(extra_config or {})
    with staged_dir(path) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        gen = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf_config[k] is not None}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "gptlab_config": json.dumps(config.to_dict())})
        if tokenizer is not None:
            tokenizer.save(tmp)
    return path


# ---------------------------------------------------------------------------------------------------------
# sequence classifiers


def classifier_extras(clf: SequenceClassifier, names: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The head's tensor and config.json fields transformers' AutoModelForSequenceClassification reads."""
    cfg = {
        "architectures": [families.get(clf.config.model_type).sequence_classifier],
        "id2label": {str(i): n for i, n in enumerate(names)},
        "label2id": {n: i for i, n in enumerate(names)},
        "pad_token_id": clf.pad_id,
        # one output (GPT-1 multiple choice: a score per sequence) is what transformers calls regression
        "problem_type": "regression" if len(names) == 1 else "single_label_classification",
    }
    return {"score.weight": clf.score.weight.detach()}, cfg


def save_classifier(clf: SequenceClassifier, path: str | os.PathLike, names: list[str], tokenizer=None) -> Path:
    tensors, cfg = classifier_extras(clf, names)
    return save(clf.model, path, tokenizer=tokenizer, extra_tensors=tensors, extra_config=cfg)


def load_classifier(path: str | os.PathLike, dtype=None, device=None) -> tuple[SequenceClassifier, list[str]]:
    """A classifier saved by `save_classifier`, or by transformers' *ForSequenceClassification (which
    stores no LM head: ours is then zero, as a classifier never reads it). Safetensors only."""
    path = Path(path)
    model, found = load_with_extras(path, dtype, device, extras=("score.weight",), head_optional=True)
    score = found["score.weight"]
    cfg = read_json(path / "config.json")
    id2label = cfg.get("id2label") or {str(i): str(i) for i in range(score.shape[0])}
    names = [id2label[str(i)] for i in range(score.shape[0])]
    clf = SequenceClassifier(model, score.shape[0], cfg.get("pad_token_id"))
    with torch.no_grad():
        clf.score.weight.copy_(score)
    return clf.eval(), names
