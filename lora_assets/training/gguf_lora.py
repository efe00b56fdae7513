"""The device format: a PEFT LoRA folder as a GGUF LoRA adapter that llama.cpp applies at run time.

Why GGUF: devices run a quantized base (the shipped SmolLM2 is a Q4_1 GGUF) through llama.cpp,
which applies a LoRA adapter as ``W x + scale * B (A x)`` on top of the quantized ``W``. The fp32
base this project trains on is that very GGUF dequantized, so the adapter fits the device's model
weight for weight.

The file is what llama.cpp's own ``convert_lora_to_gguf.py`` writes, built with the ``gguf``
package: metadata ``general.type=adapter``, ``general.architecture`` of the base,
``adapter.type=lora``, ``adapter.lora.alpha``; tensors ``<base tensor>.lora_a`` (r, in) and
``.lora_b`` (out, r), named through gguf's tensor-name map. llama.cpp stores a llama model's q/k
projections with their rows permuted (rotary halves interleaved), so the converter permutes the
rows of ``lora_B`` of q/k the same way (``B A`` then matches the permuted base rows).

Types: ``f32``, ``f16``, ``q8_0`` (what the product publishes by default: ``Settings.gguf_type``). q8_0 quantizes blocks of 32 along a row; a
``lora_B`` row has only ``r`` values (16), so ``lora_B`` stays f16 there, as in the converter.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

GGUF_FILE = "adapter.gguf"
GGUF_TYPES = ("f32", "f16", "q8_0")
DEFAULT_GGUF_TYPE = "f16"
# model_type -> (gguf architecture, whether q/k rows are permuted like llama.cpp's converter does)
_ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True)}
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


class UnsupportedForGguf(ValueError):
    """A base architecture or LoRA variant with no llama.cpp adapter form here."""


def gguf_architecture(base_config: dict[str, Any]) -> str | None:
    """The llama.cpp architecture an adapter of this base would carry; None when unsupported."""
    found = _ARCHITECTURES.get(str(base_config.get("model_type")))
    return found[0] if found else None


def write_gguf_adapter(peft_dir: Path, base_config: dict[str, Any], out: Path, qtype: str = DEFAULT_GGUF_TYPE) -> Path:
    """Write the PEFT adapter in ``peft_dir`` (fp32/fp16/bf16 safetensors) as a GGUF LoRA at ``out``."""
    import gguf
    from safetensors.torch import load_file

    if qtype not in GGUF_TYPES:
        raise ValueError(f"GGUF adapter type {qtype!r}: choose one of {', '.join(GGUF_TYPES)}")
    found = _ARCHITECTURES.get(str(base_config.get("model_type")))
    if found is None:
        raise UnsupportedForGguf(f"no GGUF adapter for base architecture {base_config.get('model_type')!r}")
    arch, permute_qk = found
    config = json.loads((Path(peft_dir) / "adapter_config.json").read_text())
    if config.get("use_dora") or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise UnsupportedForGguf("DoRA and per-module ranks have no llama.cpp adapter form")
    tensors = {k: v.float().numpy() for k, v in load_file(str(Path(peft_dir) / "adapter_model.safetensors")).items()}
    n_head = int(base_config["num_attention_heads"])
    n_kv = int(base_config.get("num_key_value_heads") or n_head)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], int(base_config["num_hidden_layers"]))

    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(config["lora_alpha"]))
    for key in sorted(tensors):
        match = _KEY.match(key)
        if match is None:
            raise UnsupportedForGguf(f"{key}: not a LoRA A/B weight")
        module, ab = match["module"], match["ab"]
        name = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if name is None:
            raise UnsupportedForGguf(f"{module}: no llama.cpp tensor for this module")
        data = tensors[key]
        if ab == "B" and permute_qk and module.endswith(("q_proj", "k_proj")):
            data = _permute(data, n_head, n_head if module.endswith("q_proj") else n_kv)
        _add(writer, gguf, f"{name}.lora_{ab.lower()}", np.ascontiguousarray(data), qtype)
    tmp = Path(out).with_name(f".{Path(out).name}.tmp")
    writer.write_header_to_file(path=tmp)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out)
    return Path(out)


def _add(writer, gguf, name: str, data: np.ndarray, qtype: str) -> None:
    if qtype == "f32":
        writer.add_tensor(name, data.astype(np.float32))
        return
    if qtype == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        packed = gguf.quants.quantize(data.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        return
    writer.add_tensor(name, data.astype(np.float16))  # f16, and q8_0's rows too short to quantize


def _permute(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` on the output rows (rotary halves interleaved per head)."""
    if n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))
