"""Interventions as small frozen, serializable objects, each with one ``apply``.

    from vlm_probe.interventions import Patch, Ablate, Skip, Knockout, SwapKV, Add

    with vlm.trace(corrupt):
        Patch("layer_out", 12, "vision").apply(vlm, corrupt, source=clean_states)
        Skip(20).apply(vlm, corrupt)
        logits = vlm.lm_head.output.save()

The same objects are what every sweep runs: a *variant* is a list of interventions, and the
engine (:mod:`vlm_probe.analyses.engine`) calls each one's ``apply`` with a
:class:`~vlm_probe.interventions.sites.Scope` that names its rows of a batched forward (and
the named runs its values come from). ``to_dict`` / :meth:`Intervention.from_dict` round-trip
through JSON, so a result that records its variants can be re-run.

**Adding an intervention means adding one class to this file**: subclass
:class:`Intervention` as a frozen dataclass with a ``kind``, write ``apply`` (site accesses in
execution order, through :mod:`~vlm_probe.interventions.sites`), and say where it acts
(``first_layer``, ``first_column``; ``decode = True`` if it acts at every generated token).
Subclasses register themselves.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import Tensor

from ..errors import InputError, InterventionError
from ..model.inputs import Batch
from . import sites as S
from .positions import PositionSpec, column_mask, positions_label, positions_from_json, positions_to_json, resolve_positions

if TYPE_CHECKING:
    from ..model.wrapper import VLM

Source = Any  #: a tensor, a mapping (site, index) -> tensor, or a run with ``.activations`` (and ``.cache``)


def as_scope(where: S.Scope | Batch | None, values: Mapping[str, Any]) -> S.Scope:
    """The scope ``apply`` acts in: a :class:`Scope`, or a plain batch (the whole forward;
    ``None`` for interventions that name no positions)."""
    if isinstance(where, S.Scope):
        return dataclasses.replace(where, values={**where.values, **values}) if values else where
    if isinstance(where, Batch) or where is None:
        return S.Scope(where, values=dict(values))  # type: ignore[arg-type]
    raise InputError(f"apply() takes the batch the trace runs (or a Scope); got {type(where).__name__}.")


def activation(source: Source, site: str, index: int) -> Tensor:
    """The activation of ``site`` at ``index`` in a source: the tensor itself, or looked up in a run."""
    if isinstance(source, Tensor):
        return source
    acts = getattr(source, "activations", source)
    if (site, index) not in acts:
        raise InputError(f"The source run has no {site!r} activation at index {index}.")
    return acts[(site, index)]


class Intervention:
    """An intervention: a frozen dataclass with a ``kind``, one ``apply`` and a JSON form."""

    kind: ClassVar[str] = ""
    #: whether it also acts at every generated token (else at the prompt only)
    decode: ClassVar[bool] = False
    #: whether it can act by editing the KV cache of earlier columns (see ``cache_column``)
    edits_cache: ClassVar[bool] = False
    _kinds: ClassVar[dict[str, type[Intervention]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            Intervention._kinds[cls.kind] = cls

    # ------------------------------------------------------------------ acting

    def apply(self, vlm: VLM, where: S.Scope | Batch | None, **values: Any) -> Any:
        """Apply it inside a running trace (or generation step).

        Args:
            where: the batch the trace runs (its positions), or a :class:`~vlm_probe.interventions.sites.Scope`.
            values: named values it reads (``source=`` for :class:`Patch` / :class:`SwapKV`, ...).
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ where it acts (for planning runs)

    def first_layer(self, vlm: VLM) -> int:
        """The first decoder layer whose computation it changes (-1: before the decoder)."""
        return -1

    def first_column(self, vlm: VLM, batch: Batch) -> int:
        """The first column (position) whose activations it changes."""
        return 0

    def cache_column(self, vlm: VLM, batch: Batch, values: Mapping[str, Any]) -> int | None:
        """If it can also act by editing the KV cache of the earlier columns: the first column
        that must still be rerun. ``None``: it cannot."""
        return None

    def touches_vision(self, vlm: VLM) -> bool:
        """Whether it edits the vision tower or the projector (their output cannot be replayed then)."""
        return False

    def sources(self, vlm: VLM) -> dict[str, set[tuple[str, int]]]:
        """Activations it reads from named runs: ``{run name: {(site, index), ...}}``."""
        return {}

    # ------------------------------------------------------------------ serialization

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.name in ("positions", "queries", "keys"):
                value = positions_to_json(value)
            elif isinstance(value, Tensor):
                value = value.tolist()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> Intervention:
        """The intervention :meth:`to_dict` described."""
        data = dict(data)
        kind = data.pop("kind", None)
        if kind not in Intervention._kinds:
            raise InputError(f"Unknown intervention kind {kind!r}; known: {sorted(Intervention._kinds)}.")
        cls = Intervention._kinds[kind]
        for name in ("positions", "queries", "keys"):
            if name in data:
                data[name] = positions_from_json(data[name])
        return cls(**data)

    def label(self) -> str:
        """A short human description."""
        return self.kind

    def acts_at_decode(self) -> bool:
        """Whether it also acts at every generated token."""
        return self.decode

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Intervention) and self.to_json() == other.to_json()

    def __hash__(self) -> int:
        return hash(self.to_json())

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items() if k != "kind")
        return f"{type(self).__name__}({fields})"


def variant_json(variant: Sequence[Intervention]) -> str:
    """The JSON form of a variant (a list of interventions)."""
    return json.dumps([iv.to_dict() for iv in variant], sort_keys=True)


def variant_from_json(text: str) -> list[Intervention]:
    """The variant :func:`variant_json` wrote."""
    return [Intervention.from_dict(d) for d in json.loads(text)]


def _column(mask: Tensor) -> int:
    columns = mask.any(0).nonzero()
    return int(columns[0]) if len(columns) else 1 << 30


def _site_positions(vlm: VLM, batch: Batch, site: str, positions: PositionSpec, what: str) -> Tensor | None:
    """The ``[batch, seq]`` mask of a token site, or ``None`` (all units) for vision and projector sites."""
    if S.site(site).tokens:
        return resolve_positions(batch, positions, vlm=vlm, what=what)
    if not (isinstance(positions, str) and positions in ("all", "vision")):
        raise InputError(f"Site {site!r} has no token positions (its units are images or patches); use positions='all'.")
    return None


@dataclass(frozen=True, eq=False, repr=False)
class _SiteIntervention(Intervention):
    site: str = "layer_out"
    layer: int = 0
    positions: PositionSpec = "all"

    def __post_init__(self) -> None:
        S.check_site(self.site)

    def index(self, vlm: VLM) -> int:
        return S.index_of(vlm, self.site, self.layer)

    def first_layer(self, vlm: VLM) -> int:
        stage = S.site(self.site).stage
        if stage == "decoder":
            return self.index(vlm)
        return vlm.n_layers if stage == "final" else -1

    def first_column(self, vlm: VLM, batch: Batch) -> int:
        mask = _site_positions(vlm, batch, self.site, self.positions, self.kind)
        return 0 if mask is None else _column(mask)

    def touches_vision(self, vlm: VLM) -> bool:
        return S.site(self.site).stage in ("vision", "projector")

    def where(self) -> str:
        return f"{self.site}@{self.layer} {positions_label(self.positions)}"


@dataclass(frozen=True, eq=False, repr=False)
class Patch(_SiteIntervention):
    """Replace ``site`` of ``layer`` at ``positions`` with the same activation of another run.

    ``apply(vlm, batch, source=value)`` with ``value`` a ``[batch, seq, dim]`` activation (of
    another run, invoke or checkpoint; same width), ``[n_selected, dim]`` or ``[dim]``; in a
    sweep, ``source`` names a captured run (``"clean"``, a donor checkpoint).
    """

    source: str = "source"
    kind: ClassVar[str] = "patch"

    def apply(self, vlm: VLM, where: S.Scope | Batch | None, **values: Any) -> Tensor | None:
        scope = as_scope(where, values)
        if scope.step:
            return None
        index = self.index(vlm)
        mask = _site_positions(vlm, scope.batch, self.site, self.positions, f"patching {self.site}")
        value = activation(scope.value(self.source, "Patch"), self.site, index)
        return S.edit(vlm, self.site, index, scope, mask, value)

    def sources(self, vlm: VLM) -> dict[str, set[tuple[str, int]]]:
        return {self.source: {(self.site, self.index(vlm))}}

    def label(self) -> str:
        return f"patch {self.where()} <- {self.source}"


@dataclass(frozen=True, eq=False, repr=False)
class Ablate(_SiteIntervention):
    """Zero-, mean- or resample-ablate ``site`` of ``layer`` at ``positions``.

    ``mode="mean"`` reads a ``[dim]`` mean and ``mode="resample"`` ``[n_ref, dim]`` rows (each
    selected position takes a row drawn with ``seed``) from the value named ``reference``.
    """

    mode: Literal["zero", "mean", "resample"] = "zero"
    reference: str = "reference"
    seed: int = 0
    kind: ClassVar[str] = "ablate"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in ("zero", "mean", "resample"):
            raise InputError(f"Unknown ablation mode {self.mode!r}; use 'zero', 'mean' or 'resample'.")

    def apply(self, vlm: VLM, where: S.Scope | Batch | None, **values: Any) -> Tensor | None:
        scope = as_scope(where, values)
        if scope.step:
            return None
        index = self.index(vlm)
        mask = _site_positions(vlm, scope.batch, self.site, self.positions, f"ablating {self.site}")
        if self.mode == "zero":
            return S.edit(vlm, self.site, index, scope, mask, torch.zeros(()))
        reference = scope.value(self.reference, f"{self.mode}-ablation")
        if reference is None:
            raise InputError(f"{self.mode}-ablation needs reference activations (see vlm_probe.interventions.mean_activation).")
        if self.mode == "mean":
            if reference.dim() != 1:
                raise InputError(f"mean-ablation takes a [dim] mean; got shape {tuple(reference.shape)}.")
            return S.edit(vlm, self.site, index, scope, mask, reference)
        if reference.dim() != 2 or mask is None:
            raise InputError(f"resample-ablation takes [n_ref, dim] rows at token positions; got {tuple(reference.shape)}.")
        generator = torch.Generator().manual_seed(self.seed)
        rows = torch.randint(0, reference.shape[0], (int(mask.sum()),), generator=generator)
        return S.edit(vlm, self.site, index, scope, mask, reference[rows])

    def label(self) -> str:
        return f"{self.mode}-ablate {self.where()}"


@dataclass(frozen=True, eq=False, repr=False)
class Add(_SiteIntervention):
    """Add ``scale * vector`` to ``site`` of ``layer`` at ``positions`` (steering).

    ``vector`` is a ``[dim]`` list of numbers or the name of a value passed to ``apply``. With
    ``every_step=True`` it also acts at every generated token (``positions`` may be ``"generated"``).
    """

    vector: str | tuple[float, ...] = "vector"
    scale: float = 1.0
    every_step: bool = False
    kind: ClassVar[str] = "add"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.vector, str):
            object.__setattr__(self, "vector", tuple(float(x) for x in torch.as_tensor(self.vector).flatten()))

    def acts_at_decode(self) -> bool:
        return self.every_step

    def apply(self, vlm: VLM, where: S.Scope | Batch | None, **values: Any) -> Tensor | None:
        scope = as_scope(where, values)
        if scope.step and not self.every_step:
            return None
        index = self.index(vlm)
        vector = scope.value(self.vector, "Add") if isinstance(self.vector, str) else torch.tensor(self.vector)
        shift = self.scale * vector.float()
        mask = None
        if S.site(self.site).tokens:
            columns = S.site(self.site).read(vlm, index).shape[1]
            mask = column_mask(scope.batch, self.positions, torch.arange(scope.start + columns), vlm=vlm, what="Add")
        return S.edit(vlm, self.site, index, scope, mask, lambda current: current + shift.to(current.dtype))

    def first_column(self, vlm: VLM, batch: Batch) -> int:
        return _column(column_mask(batch, self.positions, torch.arange(batch.width), vlm=vlm, what="Add"))

    def label(self) -> str:
        return f"add {self.where()}"


@dataclass(frozen=True, eq=False, repr=False)
class Skip(Intervention):
    """Make decoder layer ``layer`` (or vision block ``layer`` with ``site="vision_out"``) the
    identity: its output is its input. The block still runs, so a KV cache stays consistent;
    during generation it acts at every step."""

    layer: int = 0
    site: Literal["layer_out", "vision_out"] = "layer_out"
    kind: ClassVar[str] = "skip"
    decode: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.site not in S.SKIP_INPUT:
            raise InputError(f"Skip takes site 'layer_out' (a decoder layer) or 'vision_out' (a vision block); got {self.site!r}.")

    def index(self, vlm: VLM) -> int:
        return S.index_of(vlm, self.site, self.layer)

    def apply(self, vlm: VLM, where: S.Scope | Batch | None, **values: Any) -> Tensor | None:
        scope = as_scope(where, values)
        index = self.index(vlm)
        if self.site == "vision_out" and scope.step:
            return None
        identity = S.site(S.SKIP_INPUT[self.site]).read(vlm, index)  # the input runs before the output
        rows = scope.rows(identity.shape[0])
        return S.edit(vlm, self.site, index, scope, None, lambda current: identity[rows].reshape(current.shape))

    def first_layer(self, vlm: VLM) -> int:
        return self.index(vlm) if self.site == "layer_out" else -1

    def touches_vision(self, vlm: VLM) -> bool:
        return self.site == "vision_out"

    def label(self) -> str:
        return f"skip {self.site}@{self.layer}"


@dataclass(frozen=True, eq=False, repr=False)
class Knockout(Intervention):
    """Block attention edges from ``queries`` to ``keys`` in decoder ``layer`` (optionally some heads).

    Rewrites the attention mask the layer's attention receives (same result under eager and
    sdpa). Query and key positions are absolute columns of the padded batch, found from the
    cache layout at every call (prefill, suffix reruns, decode steps; sliding windows
    included); ``queries="generated"`` is the last prompt position and every generated token.
    A token always keeps attending to itself.
    """

    layer: int = 0
    queries: PositionSpec = "generated"
    keys: PositionSpec = "vision"
    heads: tuple[int, ...] | None = None
    kind: ClassVar[str] = "knockout"
    decode: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.heads is not None:
            object.__setattr__(self, "heads", tuple(int(h) for h in self.heads))

    def index(self, vlm: VLM) -> int:
        return vlm.layer_index(self.layer)

    def apply(self, vlm: VLM, where: S.Scope | Batch | None, **values: Any) -> None:
        scope = as_scope(where, values)
        index = self.index(vlm)
        sites = vlm.layers[index]
        if sites.is_cross_attention:
            raise InterventionError(
                f"Decoder layer {index} is a cross-attention layer; knockout edits self-attention edges. "
                "Block image inputs of a cross-attention layer with its cross_attention_mask instead."
            )
        if self.heads is not None and any(not 0 <= h < vlm.n_heads for h in self.heads):
            raise InputError(f"Head indices must lie in 0..{vlm.n_heads - 1}; got {list(self.heads)}.")
        args, kwargs = sites.attn.inputs
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        base = kwargs.get("attention_mask")
        n_q = int(hidden.shape[1])
        q_cols, k_cols = vlm.attention_columns(index, kwargs, n_q, None if base is None else int(base.shape[-1]))
        for spec, what in ((self.queries, "knockout queries"), (self.keys, "knockout keys")):
            _check_edge_mask(spec, None if scope.batch is None else len(scope.batch), n_q,
                             int(k_cols.max()) + 1, what)
        queries = column_mask(scope.batch, self.queries, q_cols, vlm=vlm, what="knockout queries")
        keys = column_mask(scope.batch, self.keys, k_cols, vlm=vlm, what="knockout keys")
        mask = knockout_mask(base, queries, keys, q_cols, k_cols, self.heads, vlm.n_heads,
                             scope.rows(int(hidden.shape[0])), int(hidden.shape[0]), hidden.device)
        sites.attn.inputs = (args, {**kwargs, "attention_mask": mask})

    def first_layer(self, vlm: VLM) -> int:
        return self.index(vlm)

    def first_column(self, vlm: VLM, batch: Batch) -> int:
        return _column(column_mask(batch, self.queries, torch.arange(batch.width), vlm=vlm, what="knockout queries"))

    def label(self) -> str:
        heads = "" if self.heads is None else f" heads {list(self.heads)}"
        return f"knockout {positions_label(self.queries)} <- {positions_label(self.keys)} @{self.layer}{heads}"


def _check_edge_mask(spec: Any, rows: int | None, n_q: int, width: int, what: str) -> None:
    """A boolean position mask must have one row per sample and, in a pass over several query
    positions (the prompt), a column for every key it sees (narrower masks silently name nothing there)."""
    if not (isinstance(spec, Tensor) and spec.dtype == torch.bool):
        return
    if spec.dim() != 2 or (rows is not None and spec.shape[0] != rows) or (n_q > 1 and spec.shape[1] < width):
        raise InputError(
            f"{what}: a position mask must be [batch, total] = [{rows or 'batch'}, >= {width}] (the padded batch's columns, and "
            f"optionally generated ones); got shape {tuple(spec.shape)}. Build it from batch.layout.mask(group) or "
            "pass a group name or a list of positions (with batch=...)."
        )


def knockout_mask(
    base: Tensor | None,
    queries: Tensor,
    keys: Tensor,
    q_cols: Tensor,
    k_cols: Tensor,
    heads: Sequence[int] | None,
    n_heads: int,
    rows: slice,
    total: int,
    device: torch.device,
) -> Tensor:
    """The attention mask with the edges ``queries -> keys`` of ``rows`` removed.

    Args:
        base: the mask the layer received (bool ``True``=attend, or additive float),
            ``[total, 1|H, n_q, n_k]``, or ``None`` (causal).
        queries: ``[rows, n_q]`` which of this call's queries lose edges.
        keys: ``[rows, n_k]`` which of its keys they lose.
        q_cols: ``[n_q]`` absolute columns of the queries; ``k_cols``: ``[n_k]`` of the keys.
        rows: the rows of the forward the edit applies to.
        total: rows of the forward.
    """
    n_q, n_k = len(q_cols), len(k_cols)
    q_cols, k_cols = q_cols.to(device), k_cols.to(device)
    blocked = torch.zeros(total, 1, n_q, n_k, dtype=torch.bool, device=device)
    own = q_cols[:, None] == k_cols[None, :]  # a token always attends to itself
    blocked[rows] = (queries.to(device)[:, None, :, None] & keys.to(device)[:, None, None, :]) & ~own
    if heads is not None:
        selected = torch.zeros(n_heads, dtype=torch.bool, device=device)
        selected[list(heads)] = True
        blocked = blocked & selected[None, :, None, None]
    if base is None:
        base = (k_cols[None, :] <= q_cols[:, None])[None, None].expand(total, 1, n_q, n_k)
    if base.dtype == torch.bool:
        return base & ~blocked
    return torch.where(blocked, torch.finfo(base.dtype).min, base)


@dataclass(frozen=True, eq=False, repr=False)
class SwapKV(Intervention):
    """Replace the keys and values that the target's vision tokens write at ``layers`` with the
    source image's (pre-RoPE projections; with one layout for source and target this equals
    swapping the cached keys). Acts at the prompt only, so the cache holds the swapped entries
    and generated tokens read them.

    ``source`` names the source run (its ``k``/``v`` activations), or pass
    ``{layer: (k, v)}`` from :func:`~vlm_probe.interventions.vision_kv`. When ``layers`` run to
    the last layer, the vision tokens' own later states no longer matter, so a sweep applies
    it to the KV cache and reruns only the text after the image.
    """

    layers: tuple[int, ...] = ()
    positions: PositionSpec = "vision"
    source: str = "source"
    kind: ClassVar[str] = "swap_kv"
    edits_cache: ClassVar[bool] = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(layer) for layer in self.layers))
        if not self.layers:
            raise InputError("SwapKV needs at least one layer.")

    def indices(self, vlm: VLM) -> list[int]:
        return sorted(set(vlm.layer_indices(self.layers)))

    def _mask(self, vlm: VLM, batch: Batch) -> Tensor:
        vlm.require_image_positions("the vision key/value swap")
        return resolve_positions(batch, self.positions, vlm=vlm, what="the vision key/value swap")

    def apply(self, vlm: VLM, where: S.Scope | Batch | None, **values: Any) -> None:
        scope = as_scope(where, values)
        if scope.step:
            return
        mask = self._mask(vlm, scope.batch)
        source = scope.value(self.source, "SwapKV")
        by_layer = isinstance(source, Mapping) and all(isinstance(key, int) for key in source)
        cached = mask[:, : scope.start]
        if bool(cached.any()):
            self._edit_cache(vlm, scope, source, cached)
        for layer in self.indices(vlm):
            for i, name in enumerate(("k", "v")):
                if by_layer:
                    if layer not in source:
                        raise InputError(f"No source keys/values for layer {layer}; collect them with vision_kv(...).")
                    value = source[layer][i]
                    if int(mask.sum()) != value.shape[0]:
                        raise InputError(
                            f"The target has {int(mask.sum())} vision tokens to swap but the source gives "
                            f"{value.shape[0]}; source and target must give the same number of vision tokens per row."
                        )
                    if scope.start:
                        raise InputError("Per-layer source keys/values cannot be swapped into a suffix rerun.")
                else:
                    value = activation(source, name, layer)
                if bool(mask[:, scope.start :].any()):
                    S.edit(vlm, name, layer, scope, mask, value)

    def _edit_cache(self, vlm: VLM, scope: S.Scope, source: Source, cached: Tensor) -> None:
        """Write the source's cached keys/values at the vision columns before ``scope.start``."""
        cache = getattr(source, "cache", None)
        if cache is None or scope.cache is None:
            raise InputError("A suffix rerun over vision tokens needs the source run's KV cache.")
        for layer in self.indices(vlm):
            target = scope.cache.layers[layer]
            src_k, src_v = cache.layers[layer]
            rows = scope.rows(target.keys.shape[0])
            for store, src in ((target.keys, src_k), (target.values, src_v)):
                part = store[rows].transpose(1, 2)  # [b, s, heads, head_dim] view
                part[cached] = src[..., : scope.start, :].transpose(1, 2)[cached].to(part.dtype)

    def first_layer(self, vlm: VLM) -> int:
        return self.indices(vlm)[0]

    def first_column(self, vlm: VLM, batch: Batch) -> int:
        return _column(self._mask(vlm, batch))

    def cache_column(self, vlm: VLM, batch: Batch, values: Mapping[str, Any]) -> int | None:
        layers = self.indices(vlm)
        if layers != list(range(layers[0], vlm.n_layers)):
            return None  # the vision tokens' later states still matter
        source, base = values.get(self.source), values.get("base")
        source_cache, base_cache = getattr(source, "cache", None), getattr(base, "cache", None)
        if source_cache is None or base_cache is None or not same_positions(source_cache, base_cache):
            return None
        mask = self._mask(vlm, batch)
        columns = mask.any(0).nonzero()
        if not len(columns):
            return None
        start = int(columns[-1]) + 1
        for row in mask:  # a text token between swapped ones (Idefics3's tile markers) reads the swap: rerun it
            first = row.nonzero()
            if len(first) and not bool(row[int(first[0]) : start].all()):
                return None
        return start

    def sources(self, vlm: VLM) -> dict[str, set[tuple[str, int]]]:
        return {self.source: {(name, layer) for layer in self.indices(vlm) for name in ("k", "v")}}

    def label(self) -> str:
        return f"swap kv {positions_label(self.positions)} @{list(self.layers)} <- {self.source}"


def same_positions(a: Any, b: Any) -> bool:
    """Whether two cached runs used the same position ids (their cached keys are then interchangeable)."""
    pa, pb = getattr(a, "position_ids", None), getattr(b, "position_ids", None)
    if pa is None or pb is None:
        return pa is None and pb is None
    return pa.shape == pb.shape and torch.equal(pa.cpu(), pb.cpu())


#: every intervention kind, by name
KINDS = Intervention._kinds
