"""Where a training run executes: the device, its precision, its peak FLOP/s, and the process group.

Distributed: run the same command under `torchrun --nproc_per_node=N`; the process group uses gloo on CPU
and nccl on GPU, and gradients are averaged by DistributedDataParallel.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from gptlab.errors import GptlabError


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise GptlabError(f"device {name!r} requested but CUDA is not available")
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return dev


def bf16_is_fast(device: torch.device) -> bool:
    """bf16 autocast pays off on GPUs with bf16 units and CPUs with AVX-512 BF16 / AMX instructions."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
        amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
        return bool((probe and probe()) or (amx and amx()))
    return False


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for LoopConfig.precision: bf16 when asked, or on "auto" where it is fast; else none."""
    if precision == "fp32":
        return None
    if precision == "bf16" or bf16_is_fast(device):
        return torch.bfloat16
    return None


def compile_pays(choice: str, device: torch.device, amp_dtype: torch.dtype | None) -> bool:
    """LoopConfig.compile: "on" / "off" as said; "auto" compiles where it was measured to pay for its compile
    time: on CUDA, and on CPUs training in bf16 (inductor's fused bf16 kernels; docs/training.md has the
    figures). On a CPU in fp32 it bought 1.05x after 55 s of compiling (2 AVX2 cores), and it needs a C++
    compiler."""
    if choice != "auto":
        return choice == "on"
    if device.type == "cuda":
        return True
    return device.type == "cpu" and amp_dtype is torch.bfloat16 and shutil.which("c++") is not None


def measure_peak_flops(device: torch.device, dtype: torch.dtype | None) -> float:
    """A quick matmul probe: the MFU reported on machines we have no published peak for is relative to it."""
    dt = dtype or torch.float32
    n = 1024 if device.type == "cpu" else 4096
    gen = torch.Generator(device).manual_seed(0)  # never the global RNG: resuming must not shift dropout masks
    a = torch.randn(n, n, device=device, dtype=dt, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dt, generator=gen)
    best = float("inf")
    for _ in range(8):  # the fastest of several: other processes on a shared machine only slow it down
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t


def init_distributed(device: torch.device) -> Dist:
    """Join the process group torchrun describes (WORLD_SIZE > 1); a plain run is a world of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as tdist

    if not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
