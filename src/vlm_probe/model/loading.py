"""``load()``: a checkpoint path, a hub id or an in-memory model -> :class:`VLM`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, PreTrainedModel

from ..arch import FamilySpec, get_spec
from ..errors import CheckpointError, UnsafeCheckpointError
from .processors import load_processor
from .wrapper import VLM

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _dtype(dtype: Any) -> Any:
    if isinstance(dtype, str) and dtype != "auto":
        try:
            return _DTYPES[dtype]
        except KeyError:
            raise ValueError(f"Unknown dtype {dtype!r}; use one of {sorted(_DTYPES)} or 'auto'.") from None
    return dtype


def _check_weights_format(path: Path, allow_pickle: bool) -> None:
    if not path.is_dir():
        return
    safetensors = list(path.glob("*.safetensors"))
    pickles = list(path.glob("*.bin")) + list(path.glob("*.pt")) + list(path.glob("*.pth"))
    if not safetensors and pickles and not allow_pickle:
        raise UnsafeCheckpointError(
            f"{path} holds only pickle weights ({', '.join(p.name for p in pickles[:3])}). Loading pickle files "
            "can run arbitrary code, so vlm_probe refuses them by default. Convert the checkpoint to "
            "safetensors, or pass allow_pickle=True if you trust its source."
        )
    if not safetensors and not pickles:
        raise CheckpointError(f"{path} has a config but no weight files (*.safetensors).")


def load(
    model: str | os.PathLike | PreTrainedModel | Any,
    processor: Any | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    device_map: str | dict[str, Any] | None = None,
    attn_implementation: str | None = None,
    spec: FamilySpec | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    revision: str | None = None,
    max_memory: dict[Any, str] | None = None,
    offload_folder: str | os.PathLike | None = None,
    check: bool = False,
) -> VLM:
    """Load a VLM for tracing.

    Args:
        model: a local checkpoint directory, a hub id, a loaded HF model, or an object with
            ``.model`` and ``.processor`` (a :class:`~vlm_probe.testbed.zoo.TinyVLM`).
        processor: the processor, for an in-memory model (read from the checkpoint otherwise).
        dtype: parameter dtype (``torch.bfloat16``, ``"bf16"``, ``"auto"``, ...).
        device_map: accelerate placement, e.g. ``"auto"`` or ``{"": "cuda:0"}``; with
            ``max_memory``/``offload_folder`` a model larger than one device is split.
        attn_implementation: ``"sdpa"`` (default), ``"eager"``, ...
        spec: a family spec to use instead of the registered one.
        trust_remote_code: off unless you turn it on.
        allow_pickle: accept checkpoints stored only as pickle (``.bin``) files.
        check: run :meth:`VLM.check` after loading.

    Returns:
        A :class:`VLM`.
    """
    if hasattr(model, "model") and hasattr(model, "processor") and not isinstance(model, torch.nn.Module):
        processor = processor or model.processor
        model = model.model
    if isinstance(model, torch.nn.Module):
        if processor is None:
            raise CheckpointError(
                "An in-memory model needs its processor: vlm_probe.load(model, processor=processor)."
            )
        if attn_implementation is not None:
            model.set_attn_implementation(attn_implementation)
        if dtype is not None:
            model = model.to(_dtype(dtype))
        vlm = VLM(model, processor=processor, spec=spec)
    else:
        vlm = _load_by_name(
            str(model), processor, dtype=dtype, device_map=device_map, attn_implementation=attn_implementation,
            spec=spec, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, revision=revision,
            max_memory=max_memory, offload_folder=offload_folder,
        )
    if check:
        vlm.check()
    return vlm


def _load_by_name(name: str, processor: Any, **options: Any) -> VLM:
    path = Path(name)
    local = path.exists()
    if local and not (path / "config.json").is_file():
        raise CheckpointError(
            f"{path} has no config.json, so it is not a Hugging Face checkpoint directory. "
            "Point load() at the directory that holds config.json and the *.safetensors files."
        )
    try:
        config = AutoConfig.from_pretrained(
            name, trust_remote_code=options["trust_remote_code"], revision=options["revision"]
        )
    except OSError as error:
        raise CheckpointError(f"Cannot read a model config from {name!r}: {error}") from error
    spec = options["spec"] or get_spec(config)  # unknown families fail here, before weights load
    if local:
        _check_weights_format(path, options["allow_pickle"])
    kwargs: dict[str, Any] = {
        "trust_remote_code": options["trust_remote_code"],
        "use_safetensors": None if options["allow_pickle"] else True,
    }
    for key in ("device_map", "attn_implementation", "revision", "max_memory", "offload_folder"):
        if options[key] is not None:
            kwargs[key] = options[key]
    if options["dtype"] is not None:
        kwargs["dtype"] = _dtype(options["dtype"])
    model = AutoModelForImageTextToText.from_pretrained(name, **kwargs).eval()
    if processor is None:
        processor = load_processor(name, trust_remote_code=options["trust_remote_code"])
    return VLM(model, processor=processor, spec=spec)
