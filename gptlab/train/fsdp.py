"""Fully sharded data parallel training (`--fsdp`): PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`).

Each process keeps 1/world of every parameter, gradient and optimizer moment; a block's full weights exist
only while it runs (all-gathered before its forward and backward, gradients reduce-scattered after). The
Trainer uses it in place of DDP when LoopConfig.fsdp is set and the run has more than one process:

    shard(model, device, world)      every transformer block its own unit, then the root (embeddings, head)
    full_replica(model, template)    the whole model as plain tensors on rank 0 (for the HF-format save)
    save_shards / load_shards        each rank's pieces of the weights and the optimizer state, as
                                     trainer/shard-<rank>.safetensors: a resumed run continues exactly

Checkpoints therefore hold both: the HF model dir every checkpoint has (written by rank 0 from a gathered
replica, so `gptlab generate out/run/last` works) and the shards a resume reads. safetensors, never pickle.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from gptlab.errors import GptlabError


def shard(model: nn.Module, parameters, device: torch.device, world: int) -> tuple[nn.Module, list[nn.Parameter]]:
    """Shard `model` in place over all processes. Returns a weightless (meta) copy, used to rebuild whole
    replicas, and the sharded parameters standing for `parameters` (None: all that require a gradient)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    chosen = {id(p) for p in (parameters if parameters is not None else model.parameters()) if p.requires_grad}
    names = {n for n, p in model.named_parameters() if id(p) in chosen}
    template = copy.deepcopy(model).to("meta")
    mesh = init_device_mesh(device.type, (world,))
    blocks = getattr(getattr(model, "model", model), "blocks", None)  # a GPT, or a classifier around one
    for block in blocks or ():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return template, [p for n, p in model.named_parameters() if n in names]  # fully_shard replaced them


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value on every rank (a collective); a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_replica(model: nn.Module, template: nn.Module, main: bool) -> nn.Module | None:
    """The trained model as an ordinary module with plain CPU tensors, on the main rank (None elsewhere).
    Every rank must call it: each parameter is all-gathered in turn, so only one is whole at a time per rank."""
    state = {}
    for name, t in model.state_dict().items():
        whole = full_value(t).detach().cpu()
        if main:
            state[name] = whole
    if not main:
        return None
    replica = copy.deepcopy(template)
    replica.load_state_dict(state, strict=True, assign=True)
    _retie(replica, template)
    return replica


def _retie(replica: nn.Module, template: nn.Module) -> None:
    """assign=True gave tied weights (the head sharing the embedding) one tensor each: share them again."""
    first: dict[int, str] = {}
    for name, p in template.named_parameters(remove_duplicate=False):
        if id(p) in first:
            owner, attr = _owner(replica, name)
            setattr(owner, attr, replica.get_parameter(first[id(p)]))
        else:
            first[id(p)] = name


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (module.get_submodule(path) if path else module), attr


def _unique_state(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """state_dict entries with tied tensors (the head sharing the embedding) listed once, under the first name."""
    seen: set[int] = set()
    return [(k, v) for k, v in model.state_dict().items()
            if not (_local(v).data_ptr() in seen or seen.add(_local(v).data_ptr()))]


def _params(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def save_shards(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path, rank: int) -> None:
    """This rank's pieces of every weight and optimizer moment, and the optimizer's per-parameter step count."""
    tensors = {f"model.{k}": _local(v).detach().contiguous().cpu() for k, v in _unique_state(model)}
    for i, p in enumerate(_params(optimizer)):
        for key, value in optimizer.state.get(p, {}).items():
            if torch.is_tensor(value):
                tensors[f"optim.{i}.{key}"] = _local(value).detach().contiguous().cpu()
    meta = {"rank": str(rank), "groups": json.dumps([{k: v for k, v in g.items() if k != "params"}
                                                     for g in optimizer.param_groups])}
    save_file(tensors, str(path / f"shard-{rank}.safetensors"), metadata=meta)


def load_shards(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path, rank: int) -> None:
    """Put back what save_shards wrote, on a run sharded the same way (same model, same number of processes)."""
    from torch.distributed.tensor import DTensor

    file = path / f"shard-{rank}.safetensors"
    if not file.is_file():
        raise GptlabError(f"{file} is missing: this checkpoint was not written by an --fsdp run of this size")
    try:
        tensors = load_file(str(file))
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise GptlabError(f"{file} is not a readable safetensors file ({e}); the checkpoint is damaged") from None
    with torch.no_grad():
        for name, value in _unique_state(model):
            saved = tensors.get(f"model.{name}")
            local = _local(value)
            if saved is None or saved.shape != local.shape:
                raise GptlabError(f"{file} does not fit this run's model at {name}")
            local.copy_(saved)
    for i, p in enumerate(_params(optimizer)):
        prefix = f"optim.{i}."
        state = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        for key, value in state.items():
            value = value.to(_local(p).device)
            if isinstance(p, DTensor) and value.shape == _local(p).shape:
                value = DTensor.from_local(value, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                           stride=p.stride())
            state[key] = value
        if state:
            optimizer.state[p] = state
