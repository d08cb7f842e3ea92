"""LoRA (Hu et al. 2021) as one module swap: `add_lora(model, plan)` replaces chosen nn.Linear layers with
`LoRALinear`, which adds scale * B @ A to some rows of the frozen weight.

Our attention fuses q, k and v into one `qkv` Linear (rows [q; k; v]) and GLU MLPs fuse gate and up into `fc`,
so a plan names row spans: a LoRA on HF's `q_proj` is one on the q rows of our `qkv`. Choosing targets by HF
or gptlab module name (`apply_lora(model, ["q_proj", "v_proj"])`) and PEFT's adapter files are
gptlab/formats/peft.py, which reads each family's weight rows; this module knows no family.

Many adapters on one base (serving, S-LoRA's idea): `load_adapter(model, dir, name=...)` adds a named
adapter's slots beside the others; a named slot applies only to the token rows that `lora_routing` gives
its name for the forward pass in progress, so one batch mixes base rows and rows of different adapters.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab.errors import GptlabError
from gptlab.models.model import Linear, linear


# ---------------------------------------------------------------------------------------------------------
# the layer

_ADAPTER_IDS: dict[str, int] = {}  # adapter name -> a small id, the same in every layer


_COLS: dict[tuple, torch.Tensor] = {}  # (column adapter ids, device) -> the ids as a tensor


def _adapter_id(name: str) -> int:
    return _ADAPTER_IDS.setdefault(name, len(_ADAPTER_IDS))


class _Route:
    """The forward pass's routing: {adapter name: flat token-row indices}, and per (rows, layer layout) the
    (rows, r_total) 0/1 mask that keeps each row's own adapter's columns (shared by the layers alike)."""

    def __init__(self, rows: dict[str, torch.Tensor]) -> None:
        self.rows = rows
        self._ids: torch.Tensor | None = None
        self._masks: dict[tuple, torch.Tensor] = {}

    def mask(self, n: int, cols: torch.Tensor) -> torch.Tensor:
        key = (n, cols.data_ptr())
        m = self._masks.get(key)
        if m is None:
            if self._ids is None or len(self._ids) != n:
                self._ids = torch.full((n,), -1, dtype=torch.long, device=cols.device)
                for name, r in self.rows.items():
                    self._ids[r] = _adapter_id(name)
            m = (self._ids.unsqueeze(1) == cols.unsqueeze(0)).float()
            self._masks[key] = m
        return m


_ROUTE: contextvars.ContextVar[_Route | None] = contextvars.ContextVar("lora_route", default=None)


_OFF: contextvars.ContextVar[bool] = contextvars.ContextVar("lora_off", default=False)


@contextlib.contextmanager
def lora_disabled():
    """Within the block every adapter is off: the base model, without a copy (DPO's reference with LoRA,
    as PEFT's disable_adapter). Merged weights cannot be switched off."""
    token = _OFF.set(True)
    try:
        yield
    finally:
        _OFF.reset(token)


@contextlib.contextmanager
def lora_routing(rows: dict[str, torch.Tensor]):
    """Within the block, each named adapter applies to the given rows of the flattened (B*T) tokens only,
    and named adapters absent from `rows` not at all. Unnamed (training) adapters always apply."""
    token = _ROUTE.set(_Route(rows) if rows else None)
    try:
        yield
    finally:
        _ROUTE.reset(token)


class LoRALinear(nn.Linear):
    """A Linear plus low-rank updates: y = x W^T + b + sum_k pad_k(scale_k * dropout(x) A_k^T B_k^T).

    Adapter k writes output rows [start_k, stop_k); it shares the base layer's weight and bias Parameters
    (so state-dict names stay `...qkv.weight` and the saver still finds them). Adapters are kept in fp32 when
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
        self.names: list[str | None] = []  # the named adapter each slot belongs to; None: always on
        self.lora_dropout = nn.Dropout(dropout)
        self.merged = False
        self._packed: tuple | None = None  # (versions, (A, B, cols), slot tensors) of the named slots: _pack
        self._packed_names: set[str] = set()

    def add_adapter(self, start: int, stop: int, r: int, alpha: float, rslora: bool = False,
                    name: str | None = None) -> int:
        """A new adapter on output rows [start, stop), initialised as PEFT does (A Kaiming-uniform, B = 0);
        a named one applies only where lora_routing sends it."""
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
        self.names.append(name)
        self._packed = None
        return len(self.spans) - 1

    def delta(self, k: int) -> torch.Tensor:
        """scale * B @ A for adapter k, in fp32: (stop - start, in)."""
        return self.scales[k] * (self.lora_B[k].float() @ self.lora_A[k].float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.bias)
        if self.merged or not self.spans or _OFF.get():
            return y
        route = _ROUTE.get()
        served = all(n is not None for n in self.names)  # named adapters only: inference, no dropout
        if served and route is None:
            return y
        h = x if served else self.lora_dropout(x)
        if not served:
            for A, B, (start, stop), scale, name in zip(self.lora_A, self.lora_B, self.spans, self.scales,
                                                        self.names):
                if name is None:
                    d = F.linear(F.linear(h.to(A.dtype), A) * scale, B).to(y.dtype)  # scaled at rank r: cheaper
                    y = y + (d if stop - start == self.out_features else F.pad(d, (start, self.out_features - stop)))
        if route is not None:
            y = self._routed(h, y, route)
        return y

    def _routed(self, h: torch.Tensor, y: torch.Tensor, route: _Route) -> torch.Tensor:
        """Every routed adapter's update at once, each on its own rows: all named slots packed as one
        (r_total, in) A and one (out, r_total) scaled, span-placed B; the (rows, r_total) middle is masked to
        each row's adapter. Two small matmuls per layer however many adapters the batch mixes (the dense
        form of Punica's segmented LoRA kernel; at LoRA ranks the unused columns cost little)."""
        packed = self._pack()
        if packed is None or not any(name in route.rows for name in self._packed_names):
            return y
        A, B, cols = packed
        h2 = h.reshape(-1, self.in_features)
        mid = linear(h2.to(A.dtype), A) * route.mask(len(h2), cols)  # linear: the GEMV kernel for decode rows
        d = linear(mid, B).to(y.dtype)
        return y + d.view(y.shape)

    @torch.no_grad()
    def _pack(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(A, B, column adapter ids) of the named slots; rebuilt when a slot's weights change (their
        tensor versions) or a slot is added."""
        if self._packed is not None and self._packed[0] == tuple(t._version for t in self._packed[2]):
            return self._packed[1]
        slots = [k for k, n in enumerate(self.names) if n is not None]
        if not slots:
            return None
        params = [t for k in slots for t in (self.lora_A[k], self.lora_B[k])]
        A = torch.cat([self.lora_A[k] for k in slots])
        B = torch.zeros(self.out_features, A.shape[0], device=A.device, dtype=A.dtype)
        cols, at = [], 0
        for k in slots:
            (start, stop), r = self.spans[k], self.lora_A[k].shape[0]
            B[start:stop, at:at + r] = self.lora_B[k] * self.scales[k]
            cols += [_adapter_id(self.names[k])] * r
            at += r
        layout = (tuple(cols), A.device)  # one tensor per layout, so the layers alike share one mask per step
        cols_t = _COLS.setdefault(layout, torch.tensor(cols, device=A.device))
        self._packed = (tuple(t._version for t in params), (A, B, cols_t), params)
        self._packed_names = {self.names[k] for k in slots}
        return self._packed[1]

    @torch.no_grad()
    def merge(self) -> None:
        """Fold every adapter into the weight; a second call is a no-op."""
        if self.merged:
            return
        if any(n is not None for n in self.names):
            raise GptlabError("named adapters (several on one base, for serving) cannot be merged into the weight")
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
        spans = ", ".join(f"{n + ' ' if n else ''}rows {a}:{b} r={A.shape[0]}"
                          for (a, b), A, n in zip(self.spans, self.lora_A, self.names))
        return f"{super().extra_repr()}, lora=[{spans}], merged={self.merged}"


# ---------------------------------------------------------------------------------------------------------
# add, freeze, merge


def add_lora(model: nn.Module, plan: dict[str, list[tuple[int, int]]], r: int = 8, alpha: float = 16.0,
             dropout: float = 0.0, rslora: bool = False) -> nn.Module:
    """Swap the Linear layers named in `plan` ({module: [(start, stop) output-row spans]}) for LoRALinear
    with one adapter per span, and freeze everything else. `gptlab.formats.peft.apply_lora` makes the plan
    from HF or gptlab module names.

    r, alpha: rank and scale alpha / r (alpha / sqrt(r) with rslora); dropout: on the adapter's input.
    Returns the same model, changed in place; afterwards only LoRA parameters require grad.
    """
    if r < 1:
        raise GptlabError(f"LoRA rank r must be at least 1, got {r}")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise GptlabError("this model already has LoRA layers")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, spans in plan.items():
        layer = lora_layer_at(model, name, dropout)
        for start, stop in spans:
            layer.add_adapter(start, stop, r, alpha, rslora)
    return model


def lora_layer_at(model: nn.Module, name: str, dropout: float) -> LoRALinear:
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


def adapter_names(model: nn.Module) -> list[str]:
    """The named adapters loaded beside one another (serving), in the order they were added."""
    names: dict[str, None] = {}
    for layer in lora_layers(model).values():
        names.update((n, None) for n in layer.names if n is not None)
    return list(names)


def is_lora_parameter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


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
    """Put plain nn.Linear layers back (merged first unless merge=False): a standard model for gptlab.save."""
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
