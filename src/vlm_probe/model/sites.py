"""Standard intervention sites: family-independent names for nnsight envoys.

Every family exposes ``embed``, ``layers[i]`` (with ``.input``, ``.output``, ``.attn``,
``.mlp``, ``.q``/``.k``/``.v``/``.o``, ``.input_norm``, ``.post_attn_norm``),
``final_norm``, ``lm_head``, ``vision.blocks[j]`` and ``projector``. Each name resolves to
the native nnsight envoy of the real HF module, so anything nnsight does with an envoy
(``.output``, ``.input``, ``.skip()``, ``.source``, ``.next()``) works on a standard site.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from ..arch import FamilySpec
from ..errors import LayerIndexError, SpecMismatchError


def resolve(root: Any, path: str, spec: FamilySpec, what: str) -> Any:
    """Follow a dotted ``path`` from an envoy (or module), failing loudly with the family's name."""
    obj = root
    for part in path.split("."):
        try:
            obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
        except (AttributeError, IndexError, KeyError):
            raise SpecMismatchError(
                f"{spec.display_name} spec: the {what} should be at {path!r}, but the model has no "
                f"{part!r} there ({type(getattr(obj, '_module', obj)).__name__}). The model does not "
                "match the family spec; check the transformers version or pass a corrected spec= to load()."
            ) from None
    return obj


class DecoderLayer:
    """Standard sites of one LLM decoder layer (0-based ``index``).

    ``.input`` / ``.output`` read and write the layer's residual stream input/output
    (``[batch, seq, d_model]``); the other attributes are envoys of its submodules.
    """

    def __init__(self, envoy: Any, index: int, spec: FamilySpec, cross_attention: bool) -> None:
        self.envoy = envoy
        self.index = index
        self.spec = spec
        self.is_cross_attention = cross_attention
        attn_name = spec.cross_attn if cross_attention and spec.cross_attn else spec.attn
        self.attn = resolve(envoy, attn_name, spec, f"attention of decoder layer {index}")
        self.mlp = resolve(envoy, spec.mlp, spec, f"MLP of decoder layer {index}")
        self.q = resolve(self.attn, spec.q, spec, f"q projection of decoder layer {index}")
        self.k = resolve(self.attn, spec.k, spec, f"k projection of decoder layer {index}")
        self.v = resolve(self.attn, spec.v, spec, f"v projection of decoder layer {index}")
        self.o = resolve(self.attn, spec.o, spec, f"o projection of decoder layer {index}")
        self.input_norm = resolve(envoy, spec.input_norm, spec, f"input norm of decoder layer {index}")
        self.post_attn_norm = resolve(envoy, spec.post_attn_norm, spec, f"post-attention norm of layer {index}")

    @property
    def input(self) -> Any:
        """The residual stream entering the layer, ``[batch, seq, d_model]``."""
        return self.envoy.input

    @input.setter
    def input(self, value: Any) -> None:
        self.envoy.input = value

    @property
    def output(self) -> Any:
        """The residual stream leaving the layer, ``[batch, seq, d_model]``."""
        return self.envoy.output

    @output.setter
    def output(self, value: Any) -> None:
        self.envoy.output = value

    def skip(self, replacement: Any) -> None:
        """nnsight's ``skip``: do not run the layer, pass ``replacement`` on as its output."""
        self.envoy.skip(replacement)

    @property
    def path(self) -> str:
        return self.envoy.path

    def __repr__(self) -> str:
        kind = "cross-attention" if self.is_cross_attention else "self-attention"
        return f"DecoderLayer({self.index}, {kind}, path={self.path!r})"


class SiteList(Sequence[Any]):
    """A bounds-checked list of sites whose errors name the valid range."""

    def __init__(self, items: Sequence[Any], what: str) -> None:
        self._items = list(items)
        self._what = what

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._items)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return self._items[index]
        n = len(self._items)
        if not isinstance(index, int) or not -n <= index < n:
            raise LayerIndexError(
                f"{self._what} index {index!r} is out of range: this model has {n} "
                f"({'0' if n else 'none'}{f'..{n - 1}' if n > 1 else ''}; negative indices count from the end)."
            )
        return self._items[index]

    def __repr__(self) -> str:
        return f"SiteList({self._what}, n={len(self)})"


class VisionSites:
    """The vision tower: ``blocks`` (every block list concatenated) and its ``root`` envoy."""

    def __init__(self, root: Any, blocks: Sequence[Any], depths: tuple[int, ...]) -> None:
        self.root = root
        self.blocks = SiteList(blocks, "vision block")
        self.depths = depths

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def __repr__(self) -> str:
        return f"VisionSites(depth={self.depth})"


def cross_attention_layers(spec: FamilySpec, text_config: Any) -> frozenset[int]:
    if not spec.cross_attention_layers_attr:
        return frozenset()
    return frozenset(getattr(text_config, spec.cross_attention_layers_attr, None) or ())
