"""From dataset items to generation requests under an input condition.

Conditions (what the model is shown):

* ``image``: the question with its image;
* ``blank``: the question with a blank image of the same size (M_vis's control);
* ``description``: a blank image of the same size plus the item's text description
  before the question (M_v2r's second condition);
* ``text``: the question alone (text-only reasoning items, or VQA items without their image);
* ``target`` / ``source``: a swap pair's prompt with its target (source) image, graded
  against the target's (source's) answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

from PIL import Image

from ..errors import DatasetError
from ..model.inputs import IMAGE_MARKER
from .answers import LETTERS
from .datasets import BlankImage, EvalDataset, SwapPair, TextItem, VQAItem
from .grading import AnswerKind

Condition = Literal["image", "blank", "description", "text", "target", "source"]
CONDITIONS: tuple[str, ...] = ("image", "blank", "description", "text", "target", "source")
#: The conditions each dataset layout supports; the first is the default.
SUPPORTED: dict[str, tuple[str, ...]] = {
    "vqa": ("image", "blank", "description", "text"),
    "text": ("text",),
    "swap": ("target", "source"),
}


class ImageSource(Protocol):
    size: tuple[int, int]

    def open(self) -> Image.Image: ...


@dataclass(frozen=True)
class PromptFormat:
    """How an item becomes prompt text.

    Attributes:
        instruction: appended after the question (and the options), e.g.
            ``"Answer with a single number."``; None adds nothing.
        choice_format: one line per option of a multiple-choice question.
        description_template: the prompt of the ``description`` condition.
        blank_color: RGB fill of the blank images.
    """

    instruction: str | None = None
    choice_format: str = "{letter}. {choice}"
    description_template: str = "Image description: {description}\n{question}"
    blank_color: tuple[int, int, int] = (255, 255, 255)

    def question(self, text: str, choices: Sequence[str] | None = None) -> str:
        parts = [text.strip()]
        if choices:
            parts += [self.choice_format.format(letter=LETTERS[i], choice=c) for i, c in enumerate(choices)]
        if self.instruction:
            parts.append(self.instruction)
        return "\n".join(parts)

    def record(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Request:
    """One generation to run and grade."""

    id: str
    index: int
    prompt: str
    images: tuple[ImageSource, ...]
    answer: Any
    choices: tuple[str, ...] | None = None
    kind: AnswerKind = "auto"
    iou_threshold: float = 0.5
    category: str | None = None
    task: str | None = None
    question: str = ""


def _without_marker(text: str) -> str:
    return " ".join(text.replace(IMAGE_MARKER, " ").split()) if IMAGE_MARKER in text else text


def _vqa_request(item: VQAItem, condition: str, fmt: PromptFormat) -> Request:
    question = fmt.question(item.question, item.choices)
    images: tuple[ImageSource, ...]
    if condition == "image":
        images = (item.image,)
    elif condition == "blank":
        images = (BlankImage(item.image.size, fmt.blank_color),)
    elif condition == "description":
        images = (BlankImage(item.image.size, fmt.blank_color),)
        question = fmt.description_template.format(description=item.description, question=question)
    else:  # text
        images, question = (), _without_marker(question)
    return Request(item.id, item.index, question, images, item.answer, item.choices, item.kind,
                   item.iou_threshold, item.category, item.task, item.question)


def _text_request(item: TextItem, fmt: PromptFormat) -> Request:
    question = _without_marker(fmt.question(item.question))
    return Request(item.id, item.index, question, (), item.answer, None, item.kind, 0.5, item.category,
                   item.task, item.question)


def _pair_request(pair: SwapPair, condition: str, fmt: PromptFormat) -> Request:
    image = pair.target_image if condition == "target" else pair.source_image
    answer = pair.target_answer if condition == "target" else pair.source_answer
    prompt = fmt.question(pair.prompt)
    return Request(pair.id, pair.index, prompt, (image,), answer, None, pair.kind, pair.iou_threshold,
                   pair.task, pair.task, pair.prompt)


def build_requests(
    dataset: EvalDataset[Any], condition: str, fmt: PromptFormat | None = None
) -> list[Request]:
    """The requests of every loaded item of ``dataset`` under ``condition`` (dataset order).

    Raises:
        DatasetError: a condition the layout does not support, or ``description`` on items
            without a description.
    """
    fmt = fmt or PromptFormat()
    if condition not in SUPPORTED[dataset.kind]:
        raise DatasetError(
            f"Condition {condition!r} does not apply to {dataset.kind} datasets; use one of "
            f"{list(SUPPORTED[dataset.kind])}."
        )
    if condition == "description":
        missing = [item.id for item in dataset if not item.description]
        if missing:
            raise DatasetError(
                f"{len(missing)} item(s) have no 'description' (e.g. {missing[:3]}), which the description "
                "condition (M_v2r) needs. Add descriptions, or evaluate those items without this condition."
            )
    if dataset.kind == "vqa":
        return [_vqa_request(item, condition, fmt) for item in dataset]
    if dataset.kind == "text":
        return [_text_request(item, fmt) for item in dataset]
    return [_pair_request(pair, condition, fmt) for pair in dataset]
