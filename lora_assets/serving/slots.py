"""Many users' LoRAs resident on one base model, each batch row through its own.

Punica / S-LoRA style: every target ``nn.Linear`` of the base is wrapped once in a ``SlotLora``
holding ``slots`` LoRAs stacked as ``A (slots, in, r)`` and ``B (slots, r, out)``. A batch says
which slot each row uses (slot 0 is all zeros: the bare base model); the wrapper runs the base
GEMM once for the whole batch and adds ``x @ A[slot] @ B[slot] * scaling[slot]`` per row with a
gather and two ``torch.bmm``. Adapters of a smaller rank are zero-padded to the common rank,
which adds exact zeros.

Why not peft's mixed-batch inference (``adapter_names=``): it loops over the distinct adapters of
a batch in Python (index, slice, two GEMMs, scatter per adapter per layer). With 16 distinct
adapters in a batch of 16, a SmolLM2 decoding step took 0.57x as long with one adapter here; the
gather + ``bmm`` costs the same whatever the mix (README "Serve": measured by
``benchmarks/serve_load.py``). Adapters still load exactly as peft saves them, and a test checks
that a served adapter says what plain ``PeftModel.from_pretrained`` says.

Dtypes as in peft: the LoRA weights stay fp32 on a bf16/fp16 base, the activations are cast to
fp32 for the LoRA product and the sum is cast back to the base layer's dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lora_assets.training.text import causal_lm

BASE_SLOT = 0


@dataclass(frozen=True)
class AdapterWeights:
    """One adapter's tensors by target module, as peft stores them: ``A (r, in)``, ``B (out, r)``."""

    modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    scaling: float
    rank: int
    held_out: Mapping = field(default_factory=dict, compare=False)  # the version's gate figures (whether retrieval helps)


class SlotLora(torch.nn.Module):
    """A frozen ``nn.Linear`` plus a stack of LoRAs; ``rows`` (shared by all layers) picks one per row."""

    def __init__(self, base_layer: torch.nn.Linear, slots: int, rank: int, rows: _Rows) -> None:
        super().__init__()
        self.base_layer = base_layer
        device = base_layer.weight.device
        self.a = torch.zeros(slots, base_layer.in_features, rank, device=device)
        self.b = torch.zeros(slots, rank, base_layer.out_features, device=device)
        self.scaling = torch.zeros(slots, 1, 1, device=device)
        self.rows = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        rows = self.rows
        if rows.uniform == BASE_SLOT:
            return out
        h = x.to(self.a.dtype)
        if rows.uniform is not None:  # every row on one adapter: the two GEMMs peft runs
            s = rows.uniform
            delta = F.linear(F.linear(h, self.a[s].T), self.b[s].T) * self.scaling[s]
        else:
            index = rows.index
            delta = torch.bmm(torch.bmm(h, self.a[index]), self.b[index] * self.scaling[index])
        return (out + delta).to(out.dtype)


class _Rows:
    """The slot of each row of the batch in flight (one object shared by every ``SlotLora``)."""

    uniform: int | None = BASE_SLOT
    index: torch.Tensor | None = None


class AdapterSlots:
    """The base model with ``slots`` LoRA slots on every module any served mode targets.

    Not thread-safe: one thread (the engine) runs forward passes and writes slots, so a slot is
    never rewritten while a batch reads it.
    """

    def __init__(self, model: torch.nn.Module, target_modules: set[str], slots: int, rank: int) -> None:
        self.model = model
        self.slots = slots
        self.rank = rank
        self._rows = _Rows()
        self.layers: dict[str, SlotLora] = {}
        inner = causal_lm(model)
        for name, module in list(inner.named_modules()):
            if isinstance(module, torch.nn.Linear) and name.rpartition(".")[2] in target_modules:
                layer = SlotLora(module, slots, rank, self._rows)
                parent, _, attr = name.rpartition(".")
                setattr(inner.get_submodule(parent), attr, layer)
                self.layers[name] = layer
        if not self.layers:
            raise ValueError(f"the base model has no linear layer named any of {sorted(target_modules)}")

    def check(self, weights: AdapterWeights) -> None:
        """Raise ValueError unless the adapter fits these slots (its modules are wrapped, rank fits)."""
        if weights.rank > self.rank:
            raise ValueError(f"rank {weights.rank} is above the served maximum {self.rank}")
        unknown = sorted(set(weights.modules) - set(self.layers))
        if unknown:
            raise ValueError(f"targets modules the server does not serve: {unknown[:3]}")
        for name, (a, b) in weights.modules.items():
            layer = self.layers[name]
            if a.shape != (weights.rank, layer.a.shape[1]) or b.shape != (layer.b.shape[2], weights.rank):
                raise ValueError(f"{name}: shapes {tuple(a.shape)}/{tuple(b.shape)} do not fit the base model")

    def write(self, slot: int, weights: AdapterWeights | None) -> None:
        """Put an adapter in a slot (zero-padded to the common rank), or clear it (None)."""
        if slot == BASE_SLOT:
            raise ValueError("slot 0 is the base model")
        for name, layer in self.layers.items():
            layer.a[slot].zero_()
            layer.b[slot].zero_()
            layer.scaling[slot] = 0.0
            if weights is not None and name in weights.modules:
                a, b = weights.modules[name]
                layer.a[slot, :, : weights.rank].copy_(a.T)
                layer.b[slot, : weights.rank, :].copy_(b.T)
                layer.scaling[slot] = weights.scaling

    def select(self, slots: list[int]) -> None:
        """Route the next forward pass: row ``i`` through the adapter in ``slots[i]``."""
        first = slots[0]
        if all(s == first for s in slots):
            self._rows.uniform, self._rows.index = first, None
        else:
            device = next(iter(self.layers.values())).a.device
            self._rows.uniform, self._rows.index = None, torch.tensor(slots, device=device)
