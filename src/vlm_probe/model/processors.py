"""Building, saving and loading multimodal processors, with or without torchvision.

transformers' processors for Qwen-VL, LLaVA-OneVision, SmolVLM and InternVL carry a
video processor, and every video processor needs torchvision. Without torchvision
(CPU-only installs, this project's CI) those processors cannot be constructed,
saved or loaded the usual way. The functions here build them from their parts with
the video processor left out, which is all image analyses need. With torchvision
installed, loading goes through ``AutoProcessor`` as usual.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import transformers
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, ProcessorMixin
from transformers.utils import is_torchvision_available

from ..errors import CheckpointError

PROCESSOR_CONFIG = "processor_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def build_processor(cls: type[ProcessorMixin], /, **parts: Any) -> ProcessorMixin:
    """Construct ``cls`` from its parts; a missing or ``None`` video processor is allowed.

    The type check of ``ProcessorMixin`` is relaxed for ``None`` sub-processors on this
    one instance only (no class is modified).
    """
    attributes = cls.get_attributes()
    for name in attributes:
        if "video" in name:
            parts.setdefault(name, None)
    instance = cls.__new__(cls)
    strict = cls.check_argument_for_proper_class

    def check(name: str, argument: Any) -> Any:
        return None if argument is None else strict(instance, name, argument)

    instance.check_argument_for_proper_class = check  # instance attribute, removed below
    try:
        cls.__init__(instance, **parts)
    finally:
        del instance.check_argument_for_proper_class
    return instance


def _has_absent_parts(processor: ProcessorMixin) -> bool:
    return any(getattr(processor, name, None) is None for name in processor.get_attributes())


def save_processor(processor: ProcessorMixin, directory: str | os.PathLike) -> None:
    """Save ``processor`` so that :func:`load_processor` (and, with torchvision, AutoProcessor) reads it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if not _has_absent_parts(processor):
        processor.save_pretrained(directory)
        return
    for name in processor.get_attributes():
        part = getattr(processor, name, None)
        if part is not None:
            part.save_pretrained(directory)
    config = {k: v for k, v in processor.to_dict().items() if k not in processor.get_attributes()}
    config.pop("chat_template", None)
    config["processor_class"] = type(processor).__name__
    (directory / PROCESSOR_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    if processor.chat_template:
        template = processor.chat_template
        if isinstance(template, dict):
            template = template.get("default", next(iter(template.values())))
        (directory / CHAT_TEMPLATE_FILE).write_text(template)


def _read_processor_config(path: Path) -> dict[str, Any]:
    file = path / PROCESSOR_CONFIG
    if file.is_file():
        return json.loads(file.read_text())
    return {}


def load_processor(path: str | os.PathLike, *, trust_remote_code: bool = False) -> ProcessorMixin:
    """Load the processor saved at ``path`` (a local directory or a hub id).

    Uses ``AutoProcessor`` where it can. Where the processor class needs torchvision for
    a video processor that is not installed, the processor is rebuilt from its image
    processor and tokenizer instead.
    """
    local = Path(path)
    config = _read_processor_config(local) if local.is_dir() else {}
    cls_name = config.get("processor_class")
    cls = getattr(transformers, cls_name, None) if cls_name else None
    needs_video = cls is not None and any("video" in a for a in cls.get_attributes())
    if cls is None or not needs_video or is_torchvision_available():
        try:
            return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (ImportError, AttributeError, TypeError):
            if cls is None:
                raise
    if not local.is_dir():
        raise CheckpointError(
            f"Cannot load the processor of {path!s} without torchvision: rebuilding it from its "
            "parts needs a local directory. Download it first (huggingface_hub.snapshot_download) "
            "and pass the directory."
        )
    image_processor = AutoImageProcessor.from_pretrained(local)
    tokenizer = AutoTokenizer.from_pretrained(local)
    init_kwargs = {
        k: v
        for k, v in config.items()
        if k not in ("processor_class", "auto_map") and k not in cls.get_attributes()
    }
    template_file = local / CHAT_TEMPLATE_FILE
    if template_file.is_file():
        init_kwargs["chat_template"] = template_file.read_text()
    elif getattr(tokenizer, "chat_template", None):
        init_kwargs["chat_template"] = tokenizer.chat_template
    return build_processor(cls, image_processor=image_processor, tokenizer=tokenizer, **init_kwargs)
