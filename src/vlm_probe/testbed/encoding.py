"""Turning testbed items into model inputs, fast, for training and decoding.

:meth:`vlm_probe.VLM.prepare` processes one row at a time to compute token layouts; training
needs no layouts and thousands of rows, so :class:`Encoder` renders prompts with the same
chat-template code and calls the processor once per batch. Rows with and without an image
are encoded as separate sub-batches (processors differ in how they take mixed batches).

Every encoding carries explicit ``position_ids`` (1-D positions from the attention mask, or
Qwen-VL's 3-D multimodal RoPE positions), so that a forward with a KV cache continues
positions exactly (see :mod:`vlm_probe.testbed.decoding`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from ..arch import FamilySpec
from ..errors import InputError
from ..model.inputs import DROPPED_FIELDS, render_prompt
from .tasks import Item


@dataclass
class Encoded:
    """One left-padded sub-batch: model ``inputs``, and the items it holds in order.

    ``n_target[i]`` counts the teacher-forced target tokens (response and stop token) at the end
    of row ``i`` (0 without targets).
    """

    inputs: dict[str, Tensor]
    items: list[Item]
    n_target: Int[Tensor, " batch"]

    def __len__(self) -> int:
        return len(self.items)

    @property
    def input_ids(self) -> Int[Tensor, "batch seq"]:
        return self.inputs["input_ids"]

    def target_mask(self) -> Tensor:
        """``[batch, seq]`` bool: positions whose token is a target (predicted from position - 1)."""
        width = self.input_ids.shape[1]
        column = torch.arange(width).unsqueeze(0)
        return column >= (width - self.n_target).unsqueeze(1)


def stop_text(processor: Any) -> str:
    """The token that ends an assistant turn under the processor's chat template (else EOS)."""
    tokenizer = processor.tokenizer
    template = getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
    if template:
        marker = "ANSWERMARK"
        messages = [
            {"role": "user", "content": [{"type": "text", "text": "question"}]},
            {"role": "assistant", "content": [{"type": "text", "text": marker}]},
        ]
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
        if marker in text:
            tail = text.split(marker, 1)[1]
            ids = [i for i in tokenizer(tail, add_special_tokens=False)["input_ids"] if i != tokenizer.unk_token_id]
            if ids:
                return str(tokenizer.convert_ids_to_tokens(ids[0]))
    return str(tokenizer.eos_token)


class Encoder:
    """Encode :class:`Item` lists for one model (its processor, family spec and config)."""

    def __init__(self, model: Any, processor: Any, spec: FamilySpec) -> None:
        self.model = model
        self.processor = processor
        self.spec = spec
        self.tokenizer = processor.tokenizer
        self.stop = stop_text(processor)
        self.stop_id = int(self.tokenizer.convert_tokens_to_ids(self.stop))
        #: the end-of-sequence ids a saved checkpoint generates with (the stop token and EOS)
        self.end_ids = {self.stop_id, int(self.tokenizer.eos_token_id)}
        config = model.config
        #: token ids sampling must never produce: image/video placeholders and padding
        self.suppressed = sorted(
            {
                int(t)
                for t in (
                    getattr(config, "image_token_id", None),
                    getattr(config, "video_token_id", None),
                    self.tokenizer.pad_token_id,
                )
                if t is not None
            }
        )
        rope_index = getattr(getattr(model, "model", None), "get_rope_index", None) if spec.mrope else None
        self._rope_index = rope_index
        self._rope_params = set(inspect.signature(rope_index).parameters) if rope_index is not None else set()

    def prompt(self, item: Item) -> str:
        """The item's prompt rendered with the chat template, ending with the generation prompt."""
        n_images = 0 if item.image == "none" else 1
        rendered = render_prompt(
            self.processor, self.spec, item.question, n_images, system=None, answer=None, template="auto"
        )
        return rendered.text

    def target_ids(self, response: str) -> list[int]:
        """Token ids of a response followed by the stop token."""
        return list(self.tokenizer(response + self.stop, add_special_tokens=False)["input_ids"])

    def __call__(self, items: Sequence[Item], *, targets: Sequence[str] | bool = False) -> list[Encoded]:
        """Encode ``items`` into sub-batches by image kind (scene, blank, none), order kept within each.

        Args:
            items: the items.
            targets: ``True`` to append each item's correct response (:attr:`Item.response`) and
                the stop token (teacher forcing); a list of strings (e.g. demonstrations that hold
                mistakes) to append those instead; ``False`` for prompts only.
        """
        if not items:
            raise InputError("Nothing to encode: the item list is empty.")
        if targets is True:
            texts_after = [item.response for item in items]
        elif targets is False:
            texts_after = None
        else:
            texts_after = list(targets)
            if len(texts_after) != len(items):
                raise InputError(f"Got {len(texts_after)} targets for {len(items)} items.")
        out = []
        for kind in ("scene", "blank", "none"):  # similar lengths together: described prompts are long
            index = [i for i, item in enumerate(items) if item.image == kind]
            if index:
                after = None if texts_after is None else [texts_after[i] for i in index]
                out.append(self._encode([items[i] for i in index], after, kind != "none"))
        return out

    def _encode(self, items: list[Item], after: list[str] | None, with_image: bool) -> Encoded:
        texts = [self.prompt(item) for item in items]
        n_target = [0] * len(items)
        if after is not None:
            texts = [t + a + self.stop for t, a in zip(texts, after)]
            n_target = [len(self.target_ids(a)) for a in after]
        kwargs: dict[str, Any] = {"return_tensors": "pt", "padding": True}
        if with_image:
            kwargs["images"] = [[item.picture()] for item in items]
        self.tokenizer.padding_side = "left"
        encoding = dict(self.processor(text=texts, **kwargs))
        for key in DROPPED_FIELDS:
            encoding.pop(key, None)
        inputs = {k: v for k, v in encoding.items() if isinstance(v, Tensor)}
        mask = inputs["attention_mask"]
        if not bool(mask[:, -1].all()):
            raise InputError("The processor padded on the right; the testbed needs left padding.")
        if after is not None:
            ids = inputs["input_ids"]
            for row, (a, n) in enumerate(zip(after, n_target)):
                if ids[row, ids.shape[1] - n :].tolist() != self.target_ids(a):
                    raise InputError(
                        f"The response {a!r} does not tokenize the same inside the prompt as alone; "
                        "use responses made of whole words of the tokenizer."
                    )
        inputs["position_ids"] = self.positions(inputs)
        return Encoded(inputs, list(items), torch.tensor(n_target, dtype=torch.long))

    def positions(self, inputs: dict[str, Tensor]) -> Tensor:
        """Explicit position ids: ``[batch, seq]``, or ``[3, batch, seq]`` for multimodal RoPE."""
        mask = inputs["attention_mask"]
        linear = (mask.long().cumsum(-1) - 1).clamp(min=0)
        if not self.spec.mrope:
            return linear
        if self._rope_index is not None and "image_grid_thw" in inputs:
            kwargs = {
                k: inputs[k]
                for k in ("mm_token_type_ids", "image_grid_thw", "attention_mask")
                if k in inputs and k in self._rope_params
            }
            positions, _ = self._rope_index(inputs["input_ids"], **kwargs)
            return positions
        return linear.unsqueeze(0).expand(3, -1, -1).contiguous()
