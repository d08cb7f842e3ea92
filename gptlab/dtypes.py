"""Torch dtypes by the names users type (`--dtype bf16`, config.json's "torch_dtype": "bfloat16")."""

from __future__ import annotations

import torch

from gptlab.errors import GptlabError

NAMES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
         "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in NAMES:
        raise GptlabError(f"unknown dtype {dtype!r} (use float32, bfloat16 or float16)")
    return NAMES[dtype]
