"""The site registry: every activation an intervention can read or write, in one table.

=================  ========================================  =========  ==============================
site               what                                      index      shape
=================  ========================================  =========  ==============================
``embed``          token embeddings (the LLM's input)        --         ``[batch, seq, d_model]``
``vision_in``      residual stream entering vision block j   block j    ``[units, ..., d_vision]``
``vision_out``     residual stream leaving vision block j    block j    ``[units, ..., d_vision]``
``projector``      the projector's output (image tokens)     --         ``[units, ..., d_model]``
``layer_in``       residual stream entering decoder layer i  layer i    ``[batch, seq, d_model]``
``q``/``k``/``v``  attention projections (keys pre-RoPE)     layer i    ``[batch, seq, heads*head_dim]``
``o_in``           input of the output projection            layer i    ``[batch, seq, heads*head_dim]``
``attn_out``       the attention block's output              layer i    ``[batch, seq, d_model]``
``mlp_out``        the MLP block's output                    layer i    ``[batch, seq, d_model]``
``layer_out``      residual stream leaving decoder layer i   layer i    ``[batch, seq, d_model]``
``final_norm``     the final norm's output                   --         ``[batch, seq, d_model]``
=================  ========================================  =========  ==============================

Each :class:`Site` knows how to read and write its activation inside a trace, where it runs
in the forward (:func:`order`: sweeps sort edits by it), its shape, which index it takes and
its unified layer index (vision blocks ``-depth..-1``, projector and embeddings ``0``,
decoder layers ``1..N``, final norm ``N + 1``). Vision-tower and projector activations have
no sequence axis ("units" along dim 0: images, tiles or patches, in row order); positions
there are ``"all"``.

**Adding a site means adding one entry to** ``REGISTRY`` **in this file**: the primitives,
the intervention objects, every sweep and ``collect`` read it from here.

Writes are out of place (the edited activation is a new tensor), so values saved earlier in
the same trace are never changed behind the user's back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Bool
from torch import Tensor

from ..errors import InputError
from ..model.inputs import Batch

if TYPE_CHECKING:
    from ..model.wrapper import VLM

Scope_ = Literal["embed", "vision", "projector", "decoder", "final"]

#: execution order inside one decoder layer (attention inputs: where knockouts edit the mask)
DECODER_ORDER = {"skip": -1, "layer_in": 0, "attn_in": 1, "q": 2, "k": 3, "v": 4, "o_in": 5, "attn_out": 6,
                 "mlp_out": 7, "layer_out": 8}


def _first(value: Any) -> Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


def _replace_first(old: Any, new: Tensor) -> Any:
    return (new, *old[1:]) if isinstance(old, tuple) else new


@dataclass(frozen=True)
class Site:
    """One activation site: where it is, how to read and write it, its shape and index."""

    name: str
    stage: Scope_  #: the part of the model it lives in (decides its index and execution order)
    sub: int  #: execution order inside a decoder layer / vision block
    shape: str  #: jaxtyping-style shape of the activation
    doc: str
    envoy: Callable[[Any, int], Any] = field(repr=False)  #: (vlm, index) -> nnsight envoy
    attribute: str = field(default="output", repr=False)  #: "output" or "input" of that envoy
    first: bool = field(default=False, repr=False)  #: the activation is the first entry of a tuple

    @property
    def tokens(self) -> bool:
        """Whether the activation has a sequence axis (``[batch, seq, ...]``)."""
        return self.stage in ("embed", "decoder", "final")

    @property
    def indexed(self) -> bool:
        """Whether the site takes an index (a decoder layer or a vision block)."""
        return self.stage in ("decoder", "vision")

    def read(self, vlm: VLM, index: int = 0) -> Tensor:
        value = getattr(self.envoy(vlm, index), self.attribute)
        return _first(value) if self.first else value

    def write(self, vlm: VLM, index: int, value: Tensor) -> None:
        envoy = self.envoy(vlm, index)
        if self.first:
            value = _replace_first(getattr(envoy, self.attribute), value)
        setattr(envoy, self.attribute, value)


def _layer(vlm: VLM, i: int) -> Any:
    return vlm.layers[i]


REGISTRY: dict[str, Site] = {
    site.name: site
    for site in (
        Site("embed", "embed", 0, "batch seq d_model", "token embeddings", lambda vlm, i: vlm.embed),
        Site("vision_in", "vision", 0, "units ... d_vision", "residual stream entering a vision block",
             lambda vlm, j: vlm.vision.blocks[j], "input"),
        Site("vision_out", "vision", 1, "units ... d_vision", "residual stream leaving a vision block",
             lambda vlm, j: vlm.vision.blocks[j], first=True),
        Site("projector", "projector", 0, "units ... d_model", "the projector's output", lambda vlm, i: vlm.projector,
             first=True),
        Site("layer_in", "decoder", DECODER_ORDER["layer_in"], "batch seq d_model",
             "residual stream entering a decoder layer", _layer, "input"),
        Site("q", "decoder", DECODER_ORDER["q"], "batch seq heads*head_dim", "query projection",
             lambda vlm, i: vlm.layers[i].q),
        Site("k", "decoder", DECODER_ORDER["k"], "batch seq kv_heads*head_dim", "key projection (pre-RoPE)",
             lambda vlm, i: vlm.layers[i].k),
        Site("v", "decoder", DECODER_ORDER["v"], "batch seq kv_heads*head_dim", "value projection",
             lambda vlm, i: vlm.layers[i].v),
        Site("o_in", "decoder", DECODER_ORDER["o_in"], "batch seq heads*head_dim",
             "input of the output projection (per-head attention output)", lambda vlm, i: vlm.layers[i].o, "input"),
        Site("attn_out", "decoder", DECODER_ORDER["attn_out"], "batch seq d_model",
             "the attention block's output (before the residual add)", lambda vlm, i: vlm.layers[i].attn, first=True),
        Site("mlp_out", "decoder", DECODER_ORDER["mlp_out"], "batch seq d_model",
             "the MLP block's output (before the residual add)", lambda vlm, i: vlm.layers[i].mlp),
        Site("layer_out", "decoder", DECODER_ORDER["layer_out"], "batch seq d_model",
             "residual stream leaving a decoder layer", _layer),
        Site("final_norm", "final", 0, "batch seq d_model", "the final norm's output", lambda vlm, i: vlm.final_norm),
    )
}

#: the names of the sites that sweeps and ``collect`` take, in the order of the table
SITES: tuple[str, ...] = tuple(REGISTRY)
#: the decoder sites (the only ones before sites became a registry)
DECODER_SITES: tuple[str, ...] = tuple(name for name, site in REGISTRY.items() if site.stage == "decoder")
#: the input site matching each output site (what a skipped block passes on)
SKIP_INPUT = {"layer_out": "layer_in", "vision_out": "vision_in"}


def site(name: str) -> Site:
    """The registered site called ``name``."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise InputError(f"Unknown site {name!r}; use one of {', '.join(SITES)}.") from None


def check_site(name: str) -> str:
    site(name)
    return name


def index_of(vlm: VLM, name: str, index: int | None) -> int:
    """A site's index normalized (negative ones count from the end; 0 for unindexed sites)."""
    entry = site(name)
    if entry.stage == "decoder":
        return vlm.layer_index(0 if index is None else index, "decoder")
    if entry.stage == "vision":
        return vlm.layer_index(0 if index is None else index, "vision")
    if index not in (None, 0, -1):
        raise InputError(f"Site {name!r} takes no layer index; got {index!r}.")
    return 0


def indices(vlm: VLM, name: str, chosen: Any = None) -> list[int]:
    """Every index of a site (``chosen=None``) or the chosen ones, normalized."""
    entry = site(name)
    if entry.stage in ("decoder", "vision"):
        return vlm.layer_indices(chosen, entry.stage)
    return [0]


def unified(vlm: VLM, name: str, index: int) -> int:
    """The unified layer index of a site: vision blocks ``-depth..-1``, projector and
    embeddings ``0``, decoder layers ``1..N``, final norm ``N + 1``."""
    stage = site(name).stage
    if stage == "vision":
        return index - vlm.vision.depth
    if stage == "decoder":
        return index + 1
    if stage == "final":
        return vlm.n_layers + 1
    return 0


def order(vlm: VLM, name: str, index: int = 0) -> tuple[int, int, int]:
    """Execution-order key of a site access (``name`` may also be ``attn_in``/``skip`` of a
    decoder layer): accesses inside one invoke must come in this order."""
    if name in DECODER_ORDER and name not in REGISTRY:
        return (vlm.stage_rank("decoder"), index, DECODER_ORDER[name])
    entry = site(name)
    return (vlm.stage_rank(entry.stage), index, entry.sub)


def read_many(vlm: VLM, tracer: Any, pairs: Sequence[tuple[str, int]], columns: int = 0) -> list[Any]:
    """Inside a trace, read many ``(site, index)`` activations: one invoke per stage, each in
    execution order (so no two stages' relative order is assumed). Token-site activations keep
    columns ``columns:``.

    Returns:
        A list that holds, once the trace has run, the values in the order of ``pairs``.
    """
    import nnsight

    pairs = list(pairs)
    by_stage: dict[str, list[int]] = {}
    for i, (name, _) in enumerate(pairs):
        by_stage.setdefault(site(name).stage, []).append(i)
    box = nnsight.save([None] * len(pairs))
    for members in by_stage.values():
        members = sorted(members, key=lambda i: (pairs[i][1], site(pairs[i][0]).sub))
        with tracer.invoke():
            for i in members:
                name, index = pairs[i]
                value = site(name).read(vlm, index)
                box[i] = value[:, columns:] if site(name).tokens and columns else value
    return box


def read(vlm: VLM, name: str, layer: int = 0) -> Tensor:
    """The activation at site ``name`` (of decoder layer / vision block ``layer``), inside a trace."""
    return site(name).read(vlm, layer)


def write(vlm: VLM, name: str, layer: int, value: Tensor) -> None:
    """Replace the whole activation at site ``name`` of ``layer`` with ``value``, inside a trace."""
    site(name).write(vlm, layer, value)


# ----------------------------------------------------------------------------- scope


@dataclass(frozen=True)
class Scope:
    """Where an intervention acts in the running forward.

    Inside your own trace, ``Scope(batch)`` (what ``apply(vlm, batch)`` builds): the forward
    runs ``batch``. In a sweep, the forward runs ``block[1]`` copies of ``batch`` one after
    the other, and the intervention owns copy ``block[0]`` (dim 0 of every activation is cut
    into ``block[1]`` equal parts: rows of token activations, images or patches of vision
    activations); the forward may run only columns ``start:`` (over a KV cache of the
    others), or one generated token (``step`` > 0).
    """

    batch: Batch  #: the batch whose positions interventions name
    block: tuple[int, int] | None = None  #: (which, how many) equal parts of dim 0
    start: int = 0  #: first column the forward runs
    step: int = 0  #: 0: prompt (prefill); n: the n-th generated token
    values: Mapping[str, Any] = field(default_factory=dict)  #: named tensors and source runs
    cache: Any = None  #: the KV cache a suffix forward continues from (cache edits go there)

    def rows(self, n: int) -> slice:
        """This scope's part of a dim 0 of length ``n``."""
        if self.block is None:
            return slice(0, n)
        which, count = self.block
        if n % count:
            raise InputError(f"A dimension of {n} entries cannot be cut into {count} equal variant blocks.")
        size = n // count
        return slice(which * size, (which + 1) * size)

    def value(self, name: str, what: str) -> Any:
        if name not in self.values:
            raise InputError(f"{what} needs a value named {name!r}: pass {name}=... to apply(), or run it in a sweep.")
        return self.values[name]


def edit(
    vlm: VLM,
    name: str,
    layer: int,
    where: Scope | Batch,
    mask: Bool[Tensor, "batch seq"] | None,
    values: Tensor | Callable[[Tensor], Tensor],
) -> Tensor:
    """Set the activation at the ``True`` positions of ``mask`` (of the scope's rows) to ``values``.

    Args:
        where: a :class:`Scope` (or the batch the trace runs).
        mask: ``[batch, seq]`` positions of the scope's batch (full width; ``None``: every
            position, the only choice for vision and projector sites).
        values: ``[n_true, dim]`` (one row per selected position, in row-major order), a full
            ``[batch, seq, dim]`` activation to take the selected positions from, ``[dim]``, a
            scalar, or a function of the selected current values returning new ones.

    Returns:
        The new activation.
    """
    scope = where if isinstance(where, Scope) else Scope(where)
    entry = site(name)
    current = entry.read(vlm, layer)
    new = current.clone()
    part = new[scope.rows(current.shape[0])]
    if not entry.tokens:
        if mask is not None:
            raise InputError(f"Site {name!r} has no token positions; use positions='all'.")
        if callable(values):
            part[...] = values(part)
        else:
            part[...] = values.to(part.device, part.dtype)
        entry.write(vlm, layer, new)
        return new
    columns = part.shape[1]
    if mask is not None and (mask.shape[1] < scope.start + columns or part.shape[0] != mask.shape[0]):
        raise InputError(
            f"{name!r} of layer {layer} is {tuple(current.shape)}, not [batch, seq, ...] over this batch's "
            "positions (the keys and values of a cross-attention layer run over the image, not the text)."
        )
    if mask is None:
        selected = torch.ones(part.shape[:2], dtype=torch.bool, device=part.device)
    else:
        selected = mask[:, scope.start : scope.start + columns].to(part.device)
    if callable(values):
        part[selected] = values(part[selected])
    else:
        values = values.to(part.device, part.dtype)
        full = values.dim() == current.dim() and values.shape[0] == selected.shape[0]
        if full and values.shape[1] == scope.batch.width != columns:
            values = values[:, scope.start : scope.start + columns]  # a full-width activation of another run
        if full and values.shape[1] == columns:
            part[selected] = values[selected]
        else:
            part[selected] = values
    entry.write(vlm, layer, new)
    return new
