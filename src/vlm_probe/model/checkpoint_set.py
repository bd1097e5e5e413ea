"""Checkpoint sets: several checkpoints of one architecture (Base, IN, RL, ...) run on the same inputs."""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from typing import Any

from ..errors import CheckpointMismatchError, InputError, UnknownKeyError
from .inputs import Batch
from .loading import check_load_options, load
from .wrapper import VLM

#: load()'s keyword options, which load_set() passes on (never checkpoint names)
LOAD_OPTIONS = frozenset(name for name, p in inspect.signature(load).parameters.items() if p.kind is p.KEYWORD_ONLY)

_IGNORED_CONFIG_KEYS = {"_name_or_path", "name_or_path", "transformers_version", "dtype", "torch_dtype",
                        "_attn_implementation_autoset", "architectures", "_commit_hash"}


def _config_signature(vlm: VLM) -> dict[str, Any]:
    def clean(d: Any) -> Any:
        if isinstance(d, dict):
            return {k: clean(v) for k, v in d.items() if k not in _IGNORED_CONFIG_KEYS}
        return d

    return clean(vlm.hf.config.to_dict())


def check_same_architecture(models: Mapping[str, VLM]) -> None:
    """Raise :class:`CheckpointMismatchError` naming the first difference between checkpoints."""
    names = list(models)
    ref_name, ref = names[0], models[names[0]]
    ref_shapes = {k: tuple(v.shape) for k, v in ref.hf.state_dict().items()}
    for name in names[1:]:
        other = models[name]
        if other.spec.name != ref.spec.name:
            raise CheckpointMismatchError(
                f"{name} is a {other.spec.display_name} model but {ref_name} is {ref.spec.display_name}; "
                "a checkpoint set needs one architecture."
            )
        shapes = {k: tuple(v.shape) for k, v in other.hf.state_dict().items()}
        missing = sorted(set(ref_shapes) ^ set(shapes))
        if missing:
            raise CheckpointMismatchError(
                f"{name} and {ref_name} have different tensors, e.g. {missing[:3]}; they are not checkpoints "
                "of one architecture."
            )
        for key, shape in ref_shapes.items():
            if shapes[key] != shape:
                raise CheckpointMismatchError(
                    f"{key} has shape {shapes[key]} in {name} but {shape} in {ref_name}."
                )
        a, b = _config_signature(ref), _config_signature(other)
        if a != b:
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise CheckpointMismatchError(f"{name} and {ref_name} have different configs (keys {diff[:5]}).")
        if ref.tokenizer.get_vocab() != other.tokenizer.get_vocab():
            raise CheckpointMismatchError(f"{name} and {ref_name} have different tokenizer vocabularies.")


class CheckpointSet(Mapping[str, VLM]):
    """Named checkpoints of one architecture, e.g. ``{"IN": vlm_in, "RL": vlm_rl}``.

    ``models.prepare(...)`` builds inputs once for all of them; ``models["RL"]`` is a
    :class:`VLM`. Iteration follows the order the checkpoints were given in.
    """

    def __init__(self, models: Mapping[str, VLM]) -> None:
        if not models:
            raise InputError("A checkpoint set needs at least one checkpoint.")
        check_same_architecture(models)
        self._models = dict(models)

    def __getitem__(self, name: str) -> VLM:
        try:
            return self._models[name]
        except KeyError:
            raise UnknownKeyError(f"No checkpoint {name!r} in this set; it has {', '.join(self._models)}.") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._models)

    def __len__(self) -> int:
        return len(self._models)

    @property
    def reference(self) -> VLM:
        return next(iter(self._models.values()))

    @property
    def spec(self) -> Any:
        return self.reference.spec

    @property
    def n_layers(self) -> int:
        return self.reference.n_layers

    def prepare(self, *args: Any, **kwargs: Any) -> Batch:
        """Prepare inputs once; the batch is valid for every checkpoint of the set."""
        return self.reference.prepare(*args, **kwargs)

    def __repr__(self) -> str:
        return f"CheckpointSet({', '.join(self._models)}; {self.reference.spec.display_name}, {self.n_layers} layers)"


def load_set(*, options: Mapping[str, Any] | None = None, **checkpoints: Any) -> CheckpointSet:
    """Load named checkpoints of one architecture: ``load_set(IN="path/in", RL="path/rl")``.

    Values may be paths, hub ids, :class:`VLM` objects, or anything :func:`load` takes.
    Loading options shared by every checkpoint are :func:`load`'s keyword options, given
    either directly (``load_set(IN=..., RL=..., dtype="bf16")``) or as ``options={...}``; their
    names (``dtype``, ``device_map``, ...) cannot name checkpoints.
    """
    options = dict(options or {})
    for key in LOAD_OPTIONS & set(checkpoints):
        if key in options:
            raise InputError(f"{key}= is given both directly and in options=; give it once.")
        options[key] = checkpoints.pop(key)
    unknown = set(options) - LOAD_OPTIONS
    if unknown:
        raise InputError(f"Unknown loading option(s) {sorted(unknown)}; load() takes {', '.join(sorted(LOAD_OPTIONS))}.")
    if not checkpoints:
        raise InputError("load_set() needs named checkpoints, e.g. load_set(IN='ckpt/in', RL='ckpt/rl').")
    check_load_options(options.get("dtype"), options.get("device_map"), options.get("attn_implementation"))
    models = {name: value if isinstance(value, VLM) else load(value, **options) for name, value in checkpoints.items()}
    return CheckpointSet(models)
