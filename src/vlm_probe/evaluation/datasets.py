"""Evaluation datasets: vision-token-swap pairs, VQA items and text-only reasoning items.

Three layouts, each one jsonl line per item, image paths relative to the file's folder:

* swap pairs (the published vision-functionality layout): ``id, task, target_image,
  source_image, prompt, meta`` with the answers in ``meta`` under task-specific keys
  (``target_answer``/``source_answer`` for counting, ``target_bbox_xyxy``/``source_bbox_xyxy``
  with ``iou_threshold`` for grounding, ...);
* VQA items: ``id, question, image, answer`` and optionally ``choices, category,
  description, task``; a ``datasets.Dataset`` (or any iterable of dicts with a PIL image in
  ``"image"``) works too;
* text-only reasoning items: ``id, question, answer`` and optionally ``category``.

Every image is validated on load (``verify`` and a full decode). An unreadable, truncated or
missing image does not stop the load: the item becomes a :class:`LoadFailure` with the reason,
and a run records it as a failed row.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from PIL import Image

from ..errors import DatasetError
from .grading import AnswerKind, Grade, grade, is_box

DatasetKind = Literal["vqa", "text", "swap"]
#: ``meta`` suffixes tried, in order, for the answers of a swap pair (``target_<s>``/``source_<s>``).
PAIR_ANSWER_SUFFIXES = ("answer", "bbox_xyxy", "bbox", "text", "label", "name")
_NOT_ANSWERS = ("image", "index", "path", "size")


class ImageLoadError(DatasetError):
    """An image that cannot be read (missing, unreadable or truncated)."""


_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>|\s+at 0x[0-9a-fA-F]+")


def describe_error(error: BaseException) -> str:
    """``"<Type>: <message>"`` without memory addresses, so that a failure reason is the same in
    every process (PIL writes ``<_io.BytesIO object at 0x7f...>`` into its messages)."""
    message = _OBJECT_REPR.sub(lambda m: "(image data)" if m.group().startswith("<") else "", str(error))
    return f"{type(error).__name__}: {message}"


# ----------------------------------------------------------------------------- images


@dataclass(frozen=True)
class ImageRef:
    """A validated image: a file (read again on use) or an in-memory PIL image.

    Attributes:
        path: the file, or None for an in-memory image.
        size: ``(width, height)`` in pixels.
        digest: a hash of the file's bytes (part of the dataset fingerprint).
    """

    path: Path | None
    size: tuple[int, int]
    pil: Image.Image | None = field(default=None, repr=False, compare=False)
    digest: str | None = None

    def open(self) -> Image.Image:
        """The image in RGB mode (fully decoded)."""
        if self.pil is not None:
            img = self.pil
        else:
            assert self.path is not None
            try:
                with Image.open(self.path) as handle:
                    handle.load()
                    img = handle.copy()
            except (OSError, SyntaxError, ValueError) as error:
                raise ImageLoadError(f"{self.path}: {describe_error(error)}") from error
        return img if img.mode == "RGB" else img.convert("RGB")


@dataclass(frozen=True)
class BlankImage:
    """A plain image of one colour, standing in for a real image of the same size."""

    size: tuple[int, int]
    color: tuple[int, int, int] = (255, 255, 255)

    def open(self) -> Image.Image:
        return Image.new("RGB", self.size, self.color)


def validate_image(source: str | os.PathLike | Image.Image | bytes | Mapping[str, Any]) -> ImageRef:
    """Check that an image decodes completely; return a reference to it.

    Args:
        source: a file path, a PIL image, encoded bytes, or a ``{"bytes": ..., "path": ...}``
            dict (the raw form of a ``datasets`` Image column).

    Raises:
        ImageLoadError: with the reason (missing file, not an image, truncated data, ...).
    """
    try:
        if isinstance(source, Image.Image):
            source.load()
            return ImageRef(None, source.size, source)
        if isinstance(source, Mapping):
            data = source.get("bytes")
            if data is None and source.get("path"):
                return validate_image(source["path"])
            if data is None:
                raise ImageLoadError("the image record has neither bytes nor a path")
            source = data
        if isinstance(source, (bytes, bytearray)):
            with Image.open(io.BytesIO(source)) as handle:
                handle.verify()
            img = Image.open(io.BytesIO(source))
            img.load()
            return ImageRef(None, img.size, img)
        path = Path(source)
        if not path.is_file():
            raise ImageLoadError(f"{path}: no such file")
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as handle:
            handle.verify()  # structure and checksums
        with Image.open(io.BytesIO(data)) as handle:
            handle.load()  # a full decode: truncated data fails here
            size = handle.size
        return ImageRef(path, size, digest=hashlib.sha256(data).hexdigest()[:16])
    except ImageLoadError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        where = f"{source}: " if isinstance(source, (str, os.PathLike)) else ""
        raise ImageLoadError(f"{where}{describe_error(error)}") from error


# ----------------------------------------------------------------------------- items


@dataclass(frozen=True)
class VQAItem:
    """A question about an image with its gold answer.

    ``answer`` is a string or number, a letter/index/option text when ``choices`` are given,
    or four numbers (a box); ``description`` is a text description of the image (for the
    blank-image-plus-description condition of M_v2r).
    """

    id: str
    index: int
    question: str
    image: ImageRef
    answer: Any
    choices: tuple[str, ...] | None = None
    category: str | None = None
    description: str | None = None
    task: str | None = None
    kind: AnswerKind = "auto"
    iou_threshold: float = 0.5
    meta: Mapping[str, Any] = field(default_factory=dict)

    def grade(self, response: str, **options: Any) -> Grade:
        return grade(response, self.answer, kind=self.kind, choices=self.choices,
                     iou_threshold=self.iou_threshold, question=self.question, **options)


@dataclass(frozen=True)
class TextItem:
    """A text-only reasoning question with its gold answer."""

    id: str
    index: int
    question: str
    answer: Any
    category: str | None = None
    task: str | None = None
    kind: AnswerKind = "auto"
    meta: Mapping[str, Any] = field(default_factory=dict)

    def grade(self, response: str, **options: Any) -> Grade:
        return grade(response, self.answer, kind=self.kind, question=self.question, **options)


@dataclass(frozen=True)
class SwapPair:
    """A target/source image pair of the same size for vision-token swapping.

    ``target_answer``/``source_answer`` were read from ``meta`` under ``answer_key`` (e.g.
    ``target_answer``/``source_answer`` or ``target_bbox_xyxy``/``source_bbox_xyxy``).
    """

    id: str
    index: int
    task: str
    prompt: str
    target_image: ImageRef
    source_image: ImageRef
    target_answer: Any
    source_answer: Any
    answer_key: str
    kind: AnswerKind = "auto"
    iou_threshold: float = 0.5
    meta: Mapping[str, Any] = field(default_factory=dict)

    def grade(self, response: str, which: Literal["target", "source"] = "target", **options: Any) -> Grade:
        """Grade a response against the target's (or the source's) answer."""
        answer = self.target_answer if which == "target" else self.source_answer
        return grade(response, answer, kind=self.kind, iou_threshold=self.iou_threshold,
                     question=self.prompt, **options)


@dataclass(frozen=True)
class LoadFailure:
    """An item that could not be loaded, with the reason (kept so runs can record it).

    ``answers`` maps a condition to the gold answer a run would have graded under it (a swap
    pair's ``target`` and ``source`` answers); items with one answer keep it in ``record``.
    """

    id: str
    index: int
    reason: str
    record: Mapping[str, Any] = field(default_factory=dict, repr=False)
    answers: Mapping[str, Any] = field(default_factory=dict)

    def answer(self, condition: str) -> Any:
        """The gold answer under ``condition`` (None if the record has none)."""
        return self.answers.get(condition, self.record.get("answer"))


Item = TypeVar("Item", VQAItem, TextItem, SwapPair)


@dataclass(frozen=True)
class EvalDataset(Generic[Item]):
    """Loaded items of one layout plus the items that failed to load.

    Iterate it for the good items; ``failures`` lists the others with reasons;
    ``fingerprint`` identifies the content (a resumed run refuses a changed dataset).
    """

    kind: DatasetKind
    items: tuple[Item, ...]
    failures: tuple[LoadFailure, ...]
    source: str
    fingerprint: str

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Item]:
        return iter(self.items)

    def __getitem__(self, index: int) -> Item:
        return self.items[index]

    @property
    def n_total(self) -> int:
        return len(self.items) + len(self.failures)

    def __repr__(self) -> str:
        return (f"EvalDataset(kind={self.kind!r}, items={len(self.items)}, failures={len(self.failures)}, "
                f"source={self.source!r})")


# ----------------------------------------------------------------------------- reading


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a jsonl file; a malformed line raises :class:`DatasetError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such dataset file.")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DatasetError(f"{path}, line {lineno}: not valid JSON ({error.msg}). Fix or remove the line.") \
                    from error
            if not isinstance(record, dict):
                raise DatasetError(f"{path}, line {lineno}: expected a JSON object, got {type(record).__name__}.")
            records.append(record)
    return records


def _require(record: Mapping[str, Any], keys: Sequence[str], where: str, layout: str) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        raise DatasetError(
            f"{where}: missing field(s) {missing} for the {layout} layout (fields present: {sorted(record)}). "
            "Rename the fields, or pass columns={'question': 'your_field', ...}."
        )


def _check_unique(ids: Sequence[str], source: str) -> None:
    seen: set[str] = set()
    dupes = [i for i in ids if i in seen or seen.add(i)]  # type: ignore[func-returns-value]
    if dupes:
        raise DatasetError(
            f"{source}: duplicate ids {sorted(set(dupes))[:5]}; runs are resumed by id, so ids must be unique."
        )


def _digest(records: Iterable[Mapping[str, Any]]) -> str:
    h = hashlib.sha256()
    for record in records:
        h.update(json.dumps(record, sort_keys=True, default=_default).encode())
    return h.hexdigest()[:16]


def _default(value: Any) -> Any:
    if isinstance(value, Image.Image):
        return {"size": value.size, "mode": value.mode, "sha256": hashlib.sha256(value.tobytes()).hexdigest()}
    if isinstance(value, (bytes, bytearray)):
        return hashlib.sha256(value).hexdigest()
    return str(value)


def _rename(record: Mapping[str, Any], columns: Mapping[str, str] | None) -> dict[str, Any]:
    out = dict(record)
    for ours, theirs in (columns or {}).items():
        if theirs in record:
            out[ours] = record[theirs]
    return out


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DatasetError(f"limit must be a positive number of items (or None for all), got {limit!r}.")


def _records(
    source: str | os.PathLike | Iterable[Mapping[str, Any]], columns: Mapping[str, str] | None, limit: int | None,
    loader: str,
) -> tuple[list[dict[str, Any]], Path | None, str]:
    """The (renamed) records of a source; an empty source or one in another layout raises."""
    _check_limit(limit)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        raw = read_jsonl(path)
        name = str(path)
    else:
        raw, path, name = [], None, f"<{type(source).__name__}>"
        for record in source:
            raw.append(dict(record))
            if limit is not None and len(raw) >= limit:
                break
    if not raw:
        raise DatasetError(f"{name}: the {'file' if path is not None else 'source'} holds no items.")
    records = [_rename(r, columns) for r in raw[: limit if limit is not None else None]]
    _check_layout(records[0], loader, name)
    for i, record in enumerate(records):
        record.setdefault("id", str(i))
        record["id"] = str(record["id"])
    _check_unique([r["id"] for r in records], name)
    return records, path, name


_LOADERS = {"swap": "load_swap_pairs", "vqa": "load_vqa", "text": "load_text"}


def _check_layout(record: Mapping[str, Any], loader: str, name: str) -> None:
    """Refuse records of another layout (``load_text`` on VQA items would drop their images)."""
    if "target_image" in record and "source_image" in record:
        found = "swap"
    elif record.get("image") is not None:
        found = "vqa"
    else:
        return
    if _LOADERS[found] != loader:
        hint = " (VQA items take the 'text' condition to be asked without their images)" if found == "vqa" else ""
        raise DatasetError(
            f"{name}: these are {'swap pairs' if found == 'swap' else 'VQA items'} (fields {sorted(record)}), "
            f"which {loader} would not read whole; use {_LOADERS[found]} or load_dataset{hint}."
        )


def _fingerprint(records: list[dict[str, Any]], images: Iterable[ImageRef]) -> str:
    """A hash of the records and of the bytes of every image file that loaded."""
    return _digest([*records, {"images": [ref.digest for ref in images]}])


def _image_source(value: Any, base: Path | None) -> Any:
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        return path if path.is_absolute() or base is None else base / path
    return value


def _choices(value: Any, where: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise DatasetError(f"{where}: 'choices' must be a list of strings, got {value!r}.")
    return tuple(str(c) for c in value) or None


_VQA_FIELDS = ("id", "question", "image", "answer", "choices", "category", "description", "task", "kind",
               "iou_threshold")


def load_vqa(
    source: str | os.PathLike | Iterable[Mapping[str, Any]],
    *,
    columns: Mapping[str, str] | None = None,
    limit: int | None = None,
) -> EvalDataset[VQAItem]:
    """Load VQA items from a jsonl file or an iterable of dicts (e.g. a ``datasets.Dataset``).

    Args:
        source: a jsonl path (image paths relative to its folder), or records whose
            ``"image"`` is a PIL image, bytes, a ``{"bytes", "path"}`` dict or a path.
        columns: our field name -> the source's, e.g. ``{"question": "query",
            "image": "decoded_image"}``.
        limit: keep only the first ``limit`` records.
    """
    records, path, name = _records(source, columns, limit, "load_vqa")
    base = path.parent if path is not None else None
    items, failures = [], []
    for index, record in enumerate(records):
        where = f"{name}, item {record['id']!r}"
        _require(record, ("question", "image", "answer"), where, "VQA")
        try:
            image = validate_image(_image_source(record["image"], base))
        except ImageLoadError as error:
            failures.append(LoadFailure(record["id"], index, f"image: {error}", _plain(record)))
            continue
        items.append(VQAItem(
            id=record["id"], index=index, question=str(record["question"]), image=image, answer=record["answer"],
            choices=_choices(record.get("choices"), where), category=_opt_str(record.get("category")),
            description=_opt_str(record.get("description")), task=_opt_str(record.get("task")),
            kind=record.get("kind", "auto"), iou_threshold=float(record.get("iou_threshold", 0.5)),
            meta={k: v for k, v in _plain(record).items() if k not in _VQA_FIELDS},
        ))
    return EvalDataset("vqa", tuple(items), tuple(failures), name, _fingerprint(records, [i.image for i in items]))


def load_text(
    source: str | os.PathLike | Iterable[Mapping[str, Any]],
    *,
    columns: Mapping[str, str] | None = None,
    limit: int | None = None,
) -> EvalDataset[TextItem]:
    """Load text-only reasoning items (``id, question, answer``, optional ``category``).

    Raises:
        DatasetError: an empty source, or VQA items or swap pairs (their images would be
            dropped: load them with their own loader and use the ``text`` condition).
    """
    records, _, name = _records(source, columns, limit, "load_text")
    items = []
    for index, record in enumerate(records):
        _require(record, ("question", "answer"), f"{name}, item {record['id']!r}", "text-only")
        items.append(TextItem(
            id=record["id"], index=index, question=str(record["question"]), answer=record["answer"],
            category=_opt_str(record.get("category")), task=_opt_str(record.get("task")),
            kind=record.get("kind", "auto"),
            meta={k: v for k, v in record.items() if k not in ("id", "question", "answer", "category", "task", "kind")},
        ))
    return EvalDataset("text", tuple(items), (), name, _fingerprint(records, []))


def pair_answer_key(meta: Mapping[str, Any], task: str = "") -> str:
    """The ``meta`` suffix holding a swap pair's answers (``target_<key>`` and ``source_<key>``).

    Tries :data:`PAIR_ANSWER_SUFFIXES` in order, then any other suffix present with both
    prefixes (except image paths and indices).
    """
    for suffix in PAIR_ANSWER_SUFFIXES:
        if f"target_{suffix}" in meta and f"source_{suffix}" in meta:
            return suffix
    others = [k[len("target_"):] for k in meta if k.startswith("target_") and f"source_{k[len('target_'):]}" in meta]
    others = [s for s in others if not any(word in s for word in _NOT_ANSWERS)]
    if len(others) == 1:
        return others[0]
    raise DatasetError(
        f"Task {task!r}: cannot tell which meta fields hold the answers (meta keys: {sorted(meta)}). "
        "Pass answer_keys={'" + (task or "task") + "': 'suffix'} so that meta['target_<suffix>'] and "
        "meta['source_<suffix>'] are the answers."
    )


def _pair_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if (path / "data.jsonl").is_file():
        return [path / "data.jsonl"]
    files = sorted(path.glob("*/data.jsonl"))
    if not files:
        raise DatasetError(f"{path}: no data.jsonl here or in its task folders (e.g. {path}/counting/data.jsonl).")
    return files


def load_swap_pairs(
    path: str | os.PathLike,
    *,
    answer_keys: Mapping[str, str] | None = None,
    tasks: Sequence[str] | None = None,
    limit: int | None = None,
    per_task: int | None = None,
) -> EvalDataset[SwapPair]:
    """Load vision-token-swap pairs in the published layout.

    Args:
        path: a ``data.jsonl``, a task folder holding one, or the set's root folder (every
            ``<task>/data.jsonl`` is read, tasks in name order).
        answer_keys: task -> meta suffix of its answers, where :func:`pair_answer_key` cannot
            tell (e.g. ``{"ocr": "text"}``).
        tasks: keep only these tasks.
        limit: at most this many pairs in all (the first ones, tasks in name order).
        per_task: at most this many pairs of each task.

    Raises:
        DatasetError: a missing path, an empty ``data.jsonl``, VQA or text items, missing
            fields, or no pairs left (``tasks`` matching none).
    """
    _check_limit(limit)
    _check_limit(per_task)
    root = Path(path)
    if not root.exists():
        raise DatasetError(f"{root}: no such dataset file or folder.")
    items, failures, all_records = [], [], []
    per_task_count: dict[str, int] = {}
    index = 0
    for file in _pair_files(root):
        records = read_jsonl(file)
        if not records:
            raise DatasetError(f"{file}: the file holds no items.")
        _check_layout(records[0], "load_swap_pairs", str(file))
        for record in records:
            if limit is not None and len(all_records) >= limit:
                break
            where = f"{file}, pair {record.get('id')!r}"
            _require(record, ("id", "task", "target_image", "source_image", "prompt", "meta"), where, "swap-pair")
            if tasks is not None and record["task"] not in tasks:
                continue
            if per_task is not None and per_task_count.get(str(record["task"]), 0) >= per_task:
                continue
            per_task_count[str(record["task"])] = per_task_count.get(str(record["task"]), 0) + 1
            record = {**record, "id": str(record["id"])}
            all_records.append(record)
            meta = record["meta"]
            task = str(record["task"])
            key = (answer_keys or {}).get(task) or pair_answer_key(meta, task)
            if f"target_{key}" not in meta or f"source_{key}" not in meta:
                raise DatasetError(f"{where}: meta has no target_{key}/source_{key} (keys: {sorted(meta)}).")
            answer_t, answer_s = meta[f"target_{key}"], meta[f"source_{key}"]
            answers = {"target": answer_t, "source": answer_s}
            try:
                target = validate_image(file.parent / record["target_image"])
            except ImageLoadError as error:
                failures.append(LoadFailure(record["id"], index, f"target_image: {error}", record, answers))
                index += 1
                continue
            try:
                source = validate_image(file.parent / record["source_image"])
            except ImageLoadError as error:
                failures.append(LoadFailure(record["id"], index, f"source_image: {error}", record, answers))
                index += 1
                continue
            if target.size != source.size:
                failures.append(LoadFailure(
                    record["id"], index,
                    f"target and source images differ in size ({target.size} vs {source.size}); a swap needs "
                    "the same number of vision tokens", record, answers))
                index += 1
                continue
            kind: AnswerKind = "box" if is_box(answer_t) else "auto"
            items.append(SwapPair(
                id=record["id"], index=index, task=task, prompt=str(record["prompt"]), target_image=target,
                source_image=source, target_answer=answer_t, source_answer=answer_s, answer_key=key, kind=kind,
                iou_threshold=float(meta.get("iou_threshold", 0.5)), meta=meta,
            ))
            index += 1
    if not all_records:
        raise DatasetError(f"{root}: no pairs of the tasks {list(tasks or [])} here; tasks present: "
                           f"{sorted({str(r.get('task')) for f in _pair_files(root) for r in read_jsonl(f)})}.")
    _check_unique([r["id"] for r in all_records], str(root))
    images = [ref for pair in items for ref in (pair.target_image, pair.source_image)]
    return EvalDataset("swap", tuple(items), tuple(failures), str(root), _fingerprint(all_records, images))


def detect_layout(record: Mapping[str, Any]) -> DatasetKind:
    """Which layout a record follows: ``swap`` (target/source images), ``vqa`` (an image) or ``text``."""
    if "target_image" in record and "source_image" in record:
        return "swap"
    if "image" in record:
        return "vqa"
    if "question" in record and "answer" in record:
        return "text"
    raise DatasetError(
        f"Cannot tell the dataset layout from the fields {sorted(record)}: expected swap pairs "
        "(target_image, source_image, prompt, meta), VQA items (question, image, answer) or text items "
        "(question, answer)."
    )


def load_dataset(path: str | os.PathLike, *, limit: int | None = None) -> EvalDataset[Any]:
    """Load any of the three layouts, told apart by the first record's fields.

    Raises:
        DatasetError: a missing or empty file, a malformed line, or fields of no known layout.
    """
    path = Path(path)
    first_file = _pair_files(path)[0] if path.is_dir() else path
    records = read_jsonl(first_file)
    if not records:
        raise DatasetError(f"{first_file}: the file holds no items.")
    kind = detect_layout(records[0])
    if kind == "swap":
        return load_swap_pairs(path, limit=limit)
    if path.is_dir():
        raise DatasetError(f"{path}: give the jsonl file of VQA or text items, not a folder.")
    return load_vqa(path, limit=limit) if kind == "vqa" else load_text(path, limit=limit)


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _is_image_data(value: Any) -> bool:
    return isinstance(value, (Image.Image, bytes, bytearray)) or (isinstance(value, Mapping) and "bytes" in value)


def _plain(record: Mapping[str, Any]) -> dict[str, Any]:
    """The record without in-memory image data (for failure records and metadata)."""
    return {k: v for k, v in record.items() if not _is_image_data(v)}
