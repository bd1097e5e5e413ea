"""``load()``: a checkpoint path, a hub id or an in-memory model -> :class:`VLM`."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, PreTrainedModel

from ..arch import FamilySpec, get_spec
from ..errors import CheckpointError, CorruptCheckpointError, InputError, UnsafeCheckpointError
from .processors import load_processor
from .wrapper import VLM

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}
#: device_map strings accelerate understands besides a single device
_PLACEMENTS = ("auto", "balanced", "balanced_low_0", "sequential")


def _dtype(dtype: Any) -> Any:
    if isinstance(dtype, str) and dtype != "auto":
        try:
            return _DTYPES[dtype]
        except KeyError:
            raise InputError(f"Unknown dtype {dtype!r} (--dtype); use one of {', '.join(sorted(_DTYPES))} or auto.") from None
    if dtype is not None and not isinstance(dtype, (str, torch.dtype)):
        raise InputError(f"dtype={dtype!r} is neither a torch dtype nor one of {', '.join(sorted(_DTYPES))}, auto.")
    return dtype


def attention_backends() -> list[str]:
    """Attention implementations transformers knows here (its registered ones, and eager)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    names = {"eager"}
    for key in ALL_ATTENTION_FUNCTIONS.valid_keys():
        names.update(part for part in key.split("|") if part != "paged")
    return sorted(names)


def _device(text: str, what: str) -> None:
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise InputError(f"{what}: {text!r} is not a device; use {', '.join(_PLACEMENTS)}, cpu, cuda, cuda:N, "
                         "disk or a dict of module names to devices.") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        have = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA device"
        raise InputError(f"{what}: {text!r} names a CUDA device but this machine has {have}; use cpu or auto.")


def check_load_options(dtype: Any, device_map: Any, attn_implementation: Any) -> None:
    """Validate loading options before anything is read (:class:`InputError` listing the valid values)."""
    _dtype(dtype)
    if attn_implementation is not None:
        valid = attention_backends()
        if not isinstance(attn_implementation, (str, dict)) or (
                isinstance(attn_implementation, str) and attn_implementation not in valid):
            raise InputError(f"Unknown attention implementation {attn_implementation!r} (--attn); use one of "
                             f"{', '.join(valid)}.")
    if device_map is None or isinstance(device_map, (int, torch.device)):
        return
    if isinstance(device_map, str):
        if device_map not in _PLACEMENTS and device_map != "disk":
            _device(device_map, "device_map")
        return
    if not isinstance(device_map, dict):
        raise InputError(f"device_map={device_map!r}: use a string ({', '.join(_PLACEMENTS)}, cpu, cuda:0) or a dict "
                         "of module names to devices.")
    for module, where in device_map.items():
        if isinstance(where, str) and where != "disk":
            _device(where, f"device_map[{module!r}]")


def _safetensors_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors")) + sorted(path.glob("*.safetensors.index.json"))


def _check_weights_format(path: Path, allow_pickle: bool) -> None:
    if not path.is_dir():
        return
    safetensors = _safetensors_files(path)
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
    check_load_options(dtype, device_map, attn_implementation)
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
    path = Path(name).expanduser()
    local = path.exists()
    if not local:
        _missing(name)
    if local and not path.is_dir():
        raise CheckpointError(f"{path} is a file; pass the checkpoint directory that holds config.json.")
    if local and not (path / "config.json").is_file():
        raise CheckpointError(
            f"{path} has no config.json, so it is not a Hugging Face checkpoint directory. "
            "Point load() at the directory that holds config.json and the *.safetensors files."
        )
    if local:
        _check_config(path / "config.json")
    try:
        config = AutoConfig.from_pretrained(
            str(path) if local else name, trust_remote_code=options["trust_remote_code"], revision=options["revision"]
        )
    except (OSError, ValueError) as error:
        raise CheckpointError(f"Cannot read a model config from {name!r}: {error}") from error
    spec = options["spec"] or get_spec(config)  # unknown families fail here, before weights load
    if local:
        _check_weights_format(path, options["allow_pickle"])
        if _safetensors_files(path):  # the streaming reader's checks; weights/ never imports model/
            from ..weights.reader import open_checkpoint

            open_checkpoint(path, spec=spec)  # truncated, corrupt or missing shards, named, before transformers reads them
    kwargs: dict[str, Any] = {
        "trust_remote_code": options["trust_remote_code"],
        "use_safetensors": None if options["allow_pickle"] else True,
    }
    for key in ("device_map", "attn_implementation", "revision", "max_memory", "offload_folder"):
        if options[key] is not None:
            kwargs[key] = options[key]
    if options["dtype"] is not None:
        kwargs["dtype"] = _dtype(options["dtype"])
    source = str(path) if local else name
    model, info = AutoModelForImageTextToText.from_pretrained(source, output_loading_info=True, **kwargs)
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise CheckpointError(
            f"{name} lacks {len(missing)} of the model's weights (e.g. {', '.join(missing[:3])}); transformers would "
            "fill them with random values. The checkpoint is incomplete: re-save or re-download it."
        )
    model = model.eval()
    if processor is None:
        processor = load_processor(source, trust_remote_code=options["trust_remote_code"])
    return VLM(model, processor=processor, spec=spec)


def _missing(name: str) -> None:
    """A name that is not a local path: a hub id only if it looks like one and is cached (offline)."""
    looks_like_hub_id = bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name)) and not name.startswith((".", "~"))
    if not looks_like_hub_id:
        raise CheckpointError(f"Checkpoint directory {name} does not exist. Check the path (it is not a hub id "
                              "either: those look like org/name).")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            raise CheckpointError(
                f"{name} is not a local directory, and as a hub id it is not in the local hub cache: hub loading is "
                "offline here (HF_HUB_OFFLINE=1). Check the path, or download the model first (hf download "
                f"{name})."
            )


def _check_config(file: Path) -> None:
    try:
        json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CorruptCheckpointError(f"{file} is not valid JSON ({error}); the checkpoint is damaged.") from error
