"""Torch dtypes and devices by the names users type (`--dtype bf16`, config.json's "torch_dtype": "bfloat16",
`--device cuda:1`), each checked with one clear error."""

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


def parse_device(device: torch.device | str | None) -> torch.device:
    """A torch.device from a name (None: cpu), refused when it is not a device name or not present here."""
    if isinstance(device, torch.device):
        dev = device
    else:
        try:
            dev = torch.device(device or "cpu")
        except (RuntimeError, TypeError):
            raise GptlabError(f"unknown device {device!r} (use cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GptlabError(f"device {str(device)!r} requested but CUDA is not available here (use --device cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise GptlabError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise GptlabError(f"device {str(device)!r} requested but MPS is not available here (use --device cpu)")
    return dev
