"""A user's published adapter, read from the drive exactly as a device reads it.

CURRENT -> manifest (its sha256 is in the pointer) -> every file checked against the manifest
(``drive.publish.fetch_pointed``), then the tensors are parsed from ``adapter_model.safetensors``
(never pickle) into ``slots.AdapterWeights``. What cannot be served raises ``Unservable`` with a
one-line reason naming the version.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from safetensors import SafetensorError

from lora_assets.drive.publish import FORMATS, CorruptVersion, adapter_prefix, fetch_pointed, read_current
from lora_assets.serving.slots import AdapterWeights
from lora_assets.storage import ObjectStore

_PREFIX = "base_model.model."  # peft's key prefix in front of the causal LM's module names


class Unservable(ValueError):
    """A published version the server cannot use (corrupt, another base revision, a LoRA variant)."""


@dataclass(frozen=True)
class Pointer:
    """What a user's CURRENT says: a version, or nothing (never published, withdrawn, forgotten)."""

    version: str | None
    pointer: dict | None = None


def read_pointer(drive: ObjectStore, user: str, base_model: str, mode: str) -> Pointer:
    found = read_current(drive, user, base_model, mode)
    if found is None or found[0].get("withdrawn"):
        return Pointer(None)
    return Pointer(found[0]["version"], found[0])


def load_weights(drive: ObjectStore, user: str, base_model: str, mode: str, pointer: Pointer,
                 base_revision: str, device: str = "cpu") -> AdapterWeights:
    """The verified tensors of the version ``pointer`` names."""
    prefix = adapter_prefix(user, base_model, mode)
    where = f"{prefix}/{pointer.version}"
    try:
        _, manifest, files = fetch_pointed(drive, prefix, pointer.pointer, only=FORMATS["peft"])
    except (CorruptVersion, FileNotFoundError, ValueError, KeyError) as exc:
        raise Unservable(f"{where}: {exc}") from None
    if manifest.get("base_model_revision") not in (None, base_revision):
        raise Unservable(f"{where}: trained on base revision {manifest['base_model_revision']}, "
                         f"the server runs {base_revision}")
    try:
        return _weights(files, where, device)
    except (ValueError, KeyError, TypeError, SafetensorError) as exc:  # a config or tensor file that does not parse
        if isinstance(exc, Unservable):
            raise
        raise Unservable(f"{where}: not a usable PEFT adapter ({exc})") from None


def _weights(files: dict[str, bytes], where: str, device: str) -> AdapterWeights:
    from safetensors.torch import load

    config = json.loads(files["adapter_config.json"])
    if config.get("use_dora") or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise Unservable(f"{where}: a LoRA variant the server does not serve (DoRA or per-module ranks)")
    rank = int(config["r"])
    alpha = float(config.get("lora_alpha", rank))
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    held_out = json.loads(files.get("lora_assets.json", b"{}")).get("held_out") or {}
    tensors = load(files["adapter_model.safetensors"])
    modules: dict[str, list] = {}
    for key, tensor in tensors.items():
        name, _, kind = key.removeprefix(_PREFIX).rpartition(".lora_")
        if kind not in ("A.weight", "B.weight"):
            raise Unservable(f"{where}: unexpected tensor {key}")
        modules.setdefault(name, [None, None])[0 if kind == "A.weight" else 1] = tensor.float().to(device)
    incomplete = [n for n, (a, b) in modules.items() if a is None or b is None]
    if incomplete or not modules:
        raise Unservable(f"{where}: LoRA tensors incomplete ({incomplete[:3] or 'none'})")
    return AdapterWeights({n: (a, b) for n, (a, b) in modules.items()}, scaling, rank, held_out)
