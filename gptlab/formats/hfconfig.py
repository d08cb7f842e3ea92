"""config.json <-> Config, driven both ways by each family's codecs (gptlab/formats/families/)."""

from __future__ import annotations

from typing import Any

import torch

from gptlab.errors import GptlabError
from gptlab.formats import families
from gptlab.formats.family import HFConfig
from gptlab.models.config import Config

SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")  # same key in every family and in Config


def config_from_hf(d: dict[str, Any]) -> Config:
    """Config from the dict of an HF config.json; unknown architectures or unsupported fields raise."""
    mt = d.get("model_type")
    family = families.get(mt)
    hf = HFConfig(d, mt)
    fields: dict[str, Any] = {}
    for codec in family.config:
        codec.read(hf, fields)
    fields.update({k: hf.get(k) for k in SPECIAL_TOKENS})
    try:
        return Config(model_type=mt, name=d.get("_name_or_path") or mt, **fields)
    except TypeError as e:  # a field of the wrong type in config.json
        raise GptlabError(f"config.json ({mt}) has a malformed field: {e}") from None


def config_to_hf(c: Config, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """HF config.json dict for this Config; raises when the config has no equivalent in that HF family."""
    family = families.get(c.model_type, where="cannot save:")
    d: dict[str, Any] = {"model_type": c.model_type, "architectures": [family.causal_lm]}
    for codec in family.config:
        codec.write(c, d)
    d.update({k: getattr(c, k) for k in SPECIAL_TOKENS})
    d["dtype"] = str(dtype).removeprefix("torch.")
    # what we write must read back as the same model, or the config has no HF equivalent
    back = config_from_hf(d)
    for key in c.architecture_diff(back):
        raise GptlabError(
            f"this config cannot be saved as an HF {c.model_type} checkpoint: {key}={getattr(c, key)!r} "
            f"(that family has {getattr(back, key)!r}); pick a model_type whose architecture matches"
        )
    return d
