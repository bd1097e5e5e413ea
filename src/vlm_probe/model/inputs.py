"""Turning prompts and images into model inputs with a :class:`TokenLayout`: ``prepare``.

Each sample is processed on its own (the processor's own tokenization and image
preprocessing) and batches are built by :func:`collate`, which left-pads text fields,
concatenates image fields, and supplies mask-derived ``position_ids`` for 1-D RoPE models so
that a padded row computes exactly what it computes alone. Slicing and concatenating
batches is therefore exact, and the same collate serves several invokes of one trace.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..arch import FamilySpec
from ..errors import InputError
from .layout import BatchLayout, TokenLayout, check_row
from .vision_cells import vision_cells

#: Text fields padded along the sequence dimension, with their padding value (None: pad id).
TEXT_FIELDS: dict[str, int | None] = {
    "input_ids": None,
    "attention_mask": 0,
    "token_type_ids": 0,
    "mm_token_type_ids": 0,
    "cross_attention_mask": 0,
}
#: Fields the processor returns that the model must not receive.
DROPPED_FIELDS = ("labels", "offset_mapping", "text_replacement_offsets", "special_tokens_mask")
#: The generic image marker understood in every family's prompts.
IMAGE_MARKER = "<image>"

Template = Literal["auto", "chat", "raw"]


@dataclass(frozen=True)
class ForwardInputs:
    """Model-ready keyword arguments handed to the forward untouched (one invoke per trace).

    For inputs nnsight cannot split into rows by itself, such as a continuation of a cached
    prefix (``past_key_values`` with 3-D multimodal ``position_ids``):
    ``vlm.trace(ForwardInputs(kwargs, rows=B))``.
    """

    kwargs: dict[str, Any]
    rows: int  #: batch rows of the forward


@dataclass(frozen=True)
class Row:
    """One sample: unpadded model inputs (batch dim 1), its layout and where it came from."""

    encoding: dict[str, Tensor]
    layout: TokenLayout
    text: str
    images: tuple[Image.Image, ...]
    answer: str | None = None

    @property
    def length(self) -> int:
        return int(self.encoding["input_ids"].shape[1])


@dataclass(frozen=True)
class Collator:
    """How rows of one model family become one batch."""

    spec: FamilySpec
    pad_token_id: int

    def __call__(self, rows: Sequence[Row], width: int | None = None) -> tuple[dict[str, Tensor], BatchLayout]:
        return collate(rows, self.spec, self.pad_token_id, width)


def _pad_trailing(tensor: Tensor, shape: tuple[int, ...], value: float = 0) -> Tensor:
    """Zero-pad every dimension after the first up to ``shape``."""
    pads: list[int] = []
    for have, want in zip(reversed(tensor.shape[1:]), reversed(shape)):
        pads += [0, want - have]
    return F.pad(tensor, pads, value=value) if any(pads) else tensor


def collate(
    rows: Sequence[Row], spec: FamilySpec, pad_token_id: int, width: int | None = None
) -> tuple[dict[str, Tensor], BatchLayout]:
    """Left-pad and concatenate single-row encodings into one batch.

    Args:
        rows: the samples.
        width: pad to this sequence length (default: the longest row).

    Returns:
        Model inputs ``{name: tensor}`` and the :class:`BatchLayout` of the padded rows.
    """
    if not rows:
        raise InputError("Cannot build a batch from zero samples.")
    width = max(max(r.length for r in rows), width or 0)
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row.encoding if k not in keys]
    out: dict[str, Tensor] = {}
    for key in keys:
        present = [r.encoding[key] for r in rows if key in r.encoding]
        if key in TEXT_FIELDS:
            value = TEXT_FIELDS[key]
            value = pad_token_id if value is None else value
            padded = []
            for row in rows:
                t = row.encoding.get(key)
                if t is None:
                    t = torch.full((1, row.length, *present[0].shape[2:]), value, dtype=present[0].dtype)
                pad = width - t.shape[1]
                if pad:
                    t = torch.cat([torch.full((1, pad, *t.shape[2:]), value, dtype=t.dtype), t], dim=1)
                padded.append(t)
            trailing = tuple(max(s) for s in zip(*(t.shape[2:] for t in padded)))
            out[key] = torch.cat([_pad_trailing(t, (width, *trailing)) for t in padded])
            continue
        trailing = tuple(max(s) for s in zip(*(t.shape[1:] for t in present)))
        parts = []
        for row in rows:
            t = row.encoding.get(key)
            if t is None:
                if key not in spec.per_sample_fields:
                    continue
                t = torch.zeros((1, *trailing), dtype=present[0].dtype)
            parts.append(_pad_trailing(t, trailing))
        out[key] = torch.cat(parts)
        if key in spec.first_tile_valid:
            out[key][..., 0] = 1
    mask = out["attention_mask"]
    if not spec.mrope and not bool(mask.all()):
        out["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
    layouts = BatchLayout([r.layout.shifted(width - r.length) for r in rows])
    return out, layouts


class Batch:
    """Prepared model inputs for one or more samples, with their token layout.

    ``batch.inputs`` are the tensors a forward takes; ``batch.layout`` names the positions
    (``batch.layout.vision``, ``batch.layout.mask('question')``). Index it like a list
    (``batch[0]``, ``batch[1:3]``) and concatenate with ``+``; both are exact.
    """

    def __init__(self, rows: Sequence[Row], collator: Collator, width: int | None = None) -> None:
        if not rows:
            raise InputError("A batch needs at least one sample.")
        self.rows = tuple(rows)
        self.collator = collator
        self.inputs, self.layout = collator(self.rows, width)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def width(self) -> int:
        """Padded sequence length."""
        return int(self.inputs["input_ids"].shape[1])

    @property
    def texts(self) -> list[str]:
        return [r.text for r in self.rows]

    @property
    def answers(self) -> list[str | None]:
        return [r.answer for r in self.rows]

    def __getitem__(self, index: int | slice | Sequence[int]) -> Batch:
        n = len(self.rows)
        if isinstance(index, int):
            picked = [self.rows[check_row(index, n)]]
        elif isinstance(index, slice):
            picked = list(self.rows[index])
        else:
            picked = [self.rows[check_row(i, n)] for i in index]
        return Batch(picked, self.collator)

    def __add__(self, other: Batch) -> Batch:
        if not isinstance(other, Batch):
            return NotImplemented
        if other.collator != self.collator:
            raise InputError("Cannot concatenate batches prepared for different model families.")
        return Batch(self.rows + other.rows, self.collator)

    def padded_to(self, width: int) -> Batch:
        """The same batch left-padded to ``width`` tokens (layouts shift accordingly)."""
        if width < self.width:
            raise InputError(f"Cannot pad a batch of width {self.width} down to {width}.")
        return Batch(self.rows, self.collator, width)

    def repeat(self, n: int) -> Batch:
        """Each row repeated ``n`` times in order (``[a, a, b, b]`` for n=2)."""
        return Batch([r for r in self.rows for _ in range(n)], self.collator)

    def __repr__(self) -> str:
        return f"Batch(size={len(self)}, width={self.width}, groups={self.layout.names()})"


def align(*batches: Batch) -> tuple[Batch, ...]:
    """Left-pad batches to a common width so their layouts index the same positions.

    Use it before giving batches of different lengths to separate invokes of one trace.
    """
    width = max(b.width for b in batches)
    return tuple(b.padded_to(width) for b in batches)


# ----------------------------------------------------------------------------- prompts


def _is_messages(prompt: Any) -> bool:
    return isinstance(prompt, (list, tuple)) and bool(prompt) and isinstance(prompt[0], dict) and "role" in prompt[0]


def min_image_side(processor: Any) -> int:
    """The smallest image side the processor can cut into patches: its ``patch_size`` when it
    declares one, else 1 pixel (processors that resize every image)."""
    patch = getattr(getattr(processor, "image_processor", None), "patch_size", None)
    if isinstance(patch, dict):
        patch = max(int(v) for v in patch.values() if v) if any(patch.values()) else None
    return int(patch) if isinstance(patch, int) and patch > 0 else 1


def check_image_size(image: Image.Image, processor: Any) -> None:
    """Refuse an image with a side below :func:`min_image_side` (a 0x0 image crashes most
    processors and gives Gemma3 a meaningless input)."""
    side = min_image_side(processor)
    if min(image.size) < side:
        raise InputError(
            f"An image of {image.size[0]}x{image.size[1]} pixels is too small: this processor needs at least "
            f"{side}x{side} (one patch). Check how the image was loaded or cropped."
        )


def _as_image_list(images: Any) -> list[Image.Image]:
    if images is None:
        return []
    if isinstance(images, Image.Image):
        return [images]
    out = list(images)
    for img in out:
        if not isinstance(img, Image.Image):
            raise InputError(f"Images must be PIL images; got {type(img).__name__}.")
    return out


def _check_placeholders(n_markers: int, n_images: int, *, raw: bool) -> None:
    """Placeholders and images must agree (without placeholders, chat prompts put images first)."""
    if n_markers and not n_images:
        raise InputError(
            f"The prompt holds {n_markers} image placeholder(s) but no image was given. "
            "Pass images=[...] or remove the placeholders."
        )
    if raw and n_markers != n_images:
        raise InputError(
            f"The raw prompt has {n_markers} image placeholder(s) but {n_images} image(s) were given. "
            f"Write one {IMAGE_MARKER!r} where each image goes."
        )
    if n_markers and n_markers != n_images:
        raise InputError(
            f"The prompt has {n_markers} image placeholder(s) but {n_images} image(s) were given. "
            "Give one image per placeholder, or remove the placeholders to put the images first."
        )


def _content_from_text(text: str, n_images: int, markers: tuple[str, ...]) -> list[dict[str, Any]]:
    """Split a prompt at image markers into chat content; images first when there are none."""
    pattern = "|".join(re.escape(m) for m in markers)
    pieces = re.split(f"({pattern})", text)
    n_markers = sum(1 for p in pieces if p in markers)
    _check_placeholders(n_markers, n_images, raw=False)
    if not n_markers:
        return [{"type": "image"}] * n_images + ([{"type": "text", "text": text}] if text else [])
    content: list[dict[str, Any]] = []
    for piece in pieces:
        if piece in markers:
            content.append({"type": "image"})
        elif piece:
            content.append({"type": "text", "text": piece})
    return content


@dataclass(frozen=True)
class Rendered:
    text: str
    segments: tuple[tuple[str, str], ...]  #: (group, substring) in order of appearance


def render_prompt(
    processor: Any,
    spec: FamilySpec,
    prompt: str | list[dict[str, Any]],
    n_images: int,
    *,
    system: str | None,
    answer: str | None,
    template: Template,
) -> Rendered:
    """Render one prompt to the text the processor takes, recording the text segments."""
    placeholder = spec.image_placeholder or getattr(processor, "image_token", IMAGE_MARKER)
    markers = tuple(dict.fromkeys([IMAGE_MARKER, placeholder, getattr(processor, "image_token", IMAGE_MARKER)]))
    chat_template = getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None)
    if template == "chat" and not chat_template:
        raise InputError(
            "template='chat' was asked for, but this processor has no chat template. "
            "Use template='raw' and write the prompt in the model's own format."
        )
    use_chat = template == "chat" or (template == "auto" and bool(chat_template))
    segments: list[tuple[str, str]] = []
    if _is_messages(prompt):
        if not use_chat:
            raise InputError("Chat messages need a processor with a chat template; pass a plain string instead.")
        messages = [dict(m) for m in prompt]
        n_image_items = 0
        for message in messages:
            content = message["content"]
            if isinstance(content, str):
                content = _content_from_text(content, 0, markers) if message["role"] != "user" else [
                    {"type": "text", "text": content}
                ]
                message["content"] = content
            group = {"system": "system", "assistant": "answer"}.get(message["role"], "question")
            for item in content:
                if item.get("type") == "image":
                    n_image_items += 1
                elif item.get("type") == "text" and item.get("text"):
                    segments.append((group, item["text"]))
        if n_image_items != n_images:
            raise InputError(
                f"The messages hold {n_image_items} image item(s) but {n_images} image(s) were given. "
                'Put one {"type": "image"} item in the content for each image.'
            )
        if system is not None:
            raise InputError("Pass the system prompt as a message when giving chat messages.")
    elif isinstance(prompt, str):
        if use_chat:
            messages = []
            if system is not None:
                messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
                segments.append(("system", system))
            content = _content_from_text(prompt, n_images, markers)
            segments += [("question", c["text"]) for c in content if c["type"] == "text"]
            messages.append({"role": "user", "content": content})
        else:
            pieces = re.split("(" + "|".join(re.escape(m) for m in markers) + ")", prompt)
            n_markers = sum(1 for p in pieces if p in markers)
            _check_placeholders(n_markers, n_images, raw=template == "raw")
            if not n_markers:
                pieces = [placeholder] * n_images + [prompt]
            text = (system + "\n" if system else "") + "".join(placeholder if p in markers else p for p in pieces)
            if system:
                segments.append(("system", system))
            segments += [("question", p) for p in pieces if p and p not in markers]
            if answer is not None:
                segments.append(("answer", answer))
                text += answer
            return Rendered(text, tuple(segments))
    else:
        raise InputError(f"A prompt is a string or a list of chat messages; got {type(prompt).__name__}.")
    text = processor.tokenizer.apply_chat_template(
        messages, chat_template=chat_template, tokenize=False, add_generation_prompt=True
    )
    if answer is not None:
        segments.append(("answer", answer))
        text += answer
    return Rendered(text, tuple(segments))


# ----------------------------------------------------------------------------- one row


def _char_spans(final_text: str, segments: Iterable[tuple[str, str]]) -> list[tuple[str, int, int]]:
    """Locate each segment (in order) in the text the tokenizer saw."""
    spans: list[tuple[str, int, int]] = []
    cursor = 0
    for group, piece in segments:
        stripped = piece.strip()
        if not stripped:
            continue
        start = final_text.find(stripped, cursor)
        if start < 0:
            start = final_text.find(stripped)
        if start < 0:
            continue  # a template that rewrites user text; the tokens fall into "template"
        spans.append((group, start, start + len(stripped)))
        cursor = start + len(stripped)
    return spans


def encode_row(
    processor: Any,
    spec: FamilySpec,
    config: Any,
    rendered: Rendered,
    images: list[Image.Image],
    answer: str | None,
) -> Row:
    """Process one sample and compute its :class:`TokenLayout`."""
    image_token_id = int(config.image_token_id)
    kwargs: dict[str, Any] = {"return_tensors": "pt", "return_offsets_mapping": True}
    if images:
        kwargs["images"] = [images]
        kwargs["return_text_replacement_offsets"] = True
    try:
        try:
            encoding = dict(processor(text=[rendered.text], **kwargs))
        except TypeError:  # processors without offset support
            kwargs.pop("return_text_replacement_offsets", None)
            kwargs.pop("return_offsets_mapping", None)
            encoding = dict(processor(text=[rendered.text], **kwargs))
    except ValueError as error:
        if images or "image" not in str(error).lower():
            raise
        raise InputError(f"{spec.display_name} cannot take a prompt without an image (its processor says: "
                         f"{' '.join(str(error).split())}). Pass an image with every prompt (a blank image for a "
                         "text-only control).") from error
    offsets = encoding.get("offset_mapping")
    replacements = encoding.get("text_replacement_offsets") or [[]]
    replacements = replacements[0] if replacements and isinstance(replacements[0], list) else replacements
    for key in DROPPED_FIELDS:
        encoding.pop(key, None)
    encoding = {k: v for k, v in encoding.items() if isinstance(v, Tensor)}
    ids = encoding["input_ids"][0]
    length = int(ids.shape[0])
    n_placeholders = int((ids == image_token_id).sum())
    if images and n_placeholders == 0:
        raise InputError(
            f"{len(images)} image(s) were given but the tokenized prompt holds no image token "
            f"(id {image_token_id}); the processor dropped them. Check the prompt's image placeholders."
        )
    if not images and n_placeholders:
        raise InputError(
            f"The prompt holds {n_placeholders} image token(s) but no image was given. "
            "Pass images=[...] or remove the image placeholders from the prompt."
        )

    # final text as the processor's tokenizer saw it, before placeholder expansion
    final_text = rendered.text
    if images and hasattr(processor, "prepare_inputs_layout"):
        try:
            _, texts, *_ = processor.prepare_inputs_layout(images=[images], text=[rendered.text])
            final_text = texts[0] if isinstance(texts, list) else texts
        except Exception:  # noqa: BLE001 - layout falls back to the rendered text
            final_text = rendered.text
    char_spans = _char_spans(final_text, rendered.segments)

    def expanded(c: int) -> int:
        shift = 0
        for rep in replacements:
            if rep["span"][1] <= c:
                shift += (rep["new_span"][1] - rep["new_span"][0]) - (rep["span"][1] - rep["span"][0])
        return c + shift

    vision = [i for i in range(length) if int(ids[i]) == image_token_id]
    groups: dict[str, list[int]] = {g: [] for g in ("system", "question", "answer")}
    if offsets is not None:
        offs = offsets[0].tolist()
        for group, start, end in char_spans:
            s, e = expanded(start), expanded(end)
            groups[group] += [i for i, (a, b) in enumerate(offs) if b > a and a < e and b > s and i not in vision]
    # images: by replacement spans when known, else by runs of image tokens
    per_image: list[list[int]] = []
    image_reps = [r for r in replacements if r.get("type", "image") == "image"]
    if offsets is not None and len(image_reps) == len(images) and images:
        offs = offsets[0].tolist()
        for rep in image_reps:
            a0, b0 = rep["new_span"]
            per_image.append([i for i in vision if offs[i][0] >= a0 and offs[i][1] <= b0])
        if sum(len(p) for p in per_image) != len(vision):
            per_image = []
    if not per_image and images:
        from .vision_cells import _runs

        runs = _runs(vision)
        if len(runs) == len(images):
            per_image = runs
        else:  # tiles separated by markers: split evenly by image
            k = len(vision) // len(images)
            per_image = [vision[i * k : (i + 1) * k] for i in range(len(images))]
    image_sizes = [(img.height, img.width) for img in images]
    cells, tiles = vision_cells(spec, config, processor, ids, per_image, encoding, image_sizes)

    answer_start = min(groups["answer"]) if groups["answer"] else length
    used = set(vision) | {p for g in groups.values() for p in g}
    spans: dict[str, tuple[int, ...]] = {
        "vision": tuple(p for img in per_image for p in img),
        **{f"image{k}": tuple(p) for k, p in enumerate(per_image)},
        "system": tuple(sorted(set(groups["system"]))),
        "question": tuple(sorted(set(groups["question"]))),
        "answer": tuple(sorted(set(groups["answer"]))),
        "template": tuple(i for i in range(length) if i not in used),
        "text": tuple(i for i in range(length) if i not in vision),
        "prompt": tuple(range(answer_start)),
        "last": (length - 1,),
        "last_prompt": (answer_start - 1,),
        "pad": (),
    }
    layout = TokenLayout(length=length, spans=spans, cells=tuple(cells), tiles=tiles, image_sizes=tuple(image_sizes))
    return Row(encoding=encoding, layout=layout, text=rendered.text, images=tuple(images), answer=answer)
