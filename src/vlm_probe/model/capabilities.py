"""What a wrapped model can do, asked by the analyses instead of reading the family spec.

:class:`Capabilities` is a mixin of :class:`~vlm_probe.model.wrapper.VLM`. The layers above
the model (interventions, analyses) never split spec paths, read spec flags or touch nnsight's
private attributes: they ask these methods (the language model's envoy, whether a suffix
rerun over a KV cache is exact, the model's own readout, the attention-function call of a
layer, the absolute columns of an attention call's queries and keys, ...).
"""

from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from jaxtyping import Float, Int
from PIL import Image
from torch import Tensor

from ..errors import InputError, LayerIndexError, SpecMismatchError

#: the attention-function call inside an attention module's forward
_ATTENTION_CALL = re.compile(r"(?<![\w.])attention_interface\(")

#: execution stages of a forward, in their usual order (``stage_order`` measures it)
STAGES = ("embed", "vision", "projector", "decoder", "final", "output")


def find_attention_call(source: Any) -> str:
    """Name of the one ``attention_interface(...)`` call among a module's source operations.

    Operation labels are positional and change between nnsight versions, so they are found by
    reading the forward's source, never hard-coded.
    """
    compiled = source.compiled
    text = compiled.source.split("\n")
    calls = [name for name in compiled.names if name.startswith("attention_interface_")
             and _ATTENTION_CALL.search(text[compiled.lines[name] - 1])]
    if len(calls) != 1:
        raise SpecMismatchError(
            f"Cannot find the one attention-function call in this attention module's forward (candidates: {calls}); "
            "attention readouts need the transformers attention interface."
        )
    return calls[0]


class Capabilities:
    """Capability methods of the wrapper (mixed into :class:`~vlm_probe.model.wrapper.VLM`)."""

    # set by VLM._init_sites
    spec: Any
    layers: Any
    vision: Any

    def _init_capabilities(self) -> None:
        """Resolve, once at load time, what the capability methods need (fails loudly)."""
        from .sites import resolve

        set_ = object.__setattr__
        set_(self, "language_model", resolve(self, self.spec.decoder_layers.rsplit(".", 1)[0], self.spec,
                                               "language model"))
        set_(self, "_stage_rank", None)
        names: dict[type, str] = {}
        problem = None
        for layer in self.layers:
            if layer.is_cross_attention:
                continue
            cls = type(layer.attn._module)
            if cls in names:
                continue
            try:
                names[cls] = find_attention_call(layer.attn.source)
            except Exception as error:  # noqa: BLE001 - any failure makes attention readouts unavailable
                problem = f"{self.spec.display_name}: {error}"
        if problem is not None:
            warnings.warn(problem + " Attention mass and attention readouts will refuse this model.", stacklevel=3)
        set_(self, "_attention_calls", names)
        set_(self, "_attention_problem", problem)

    # ------------------------------------------------------------------ layer indices

    def layer_index(self, index: int, kind: str = "decoder") -> int:
        """``index`` as a 0-based index (negative ones count from the end) into the decoder
        layers (``kind="decoder"``) or the vision blocks (``kind="vision"``)."""
        n = len(self.layers) if kind == "decoder" else self.vision.depth
        what = "decoder layer" if kind == "decoder" else "vision block"
        if isinstance(index, bool) or not isinstance(index, (int,)) and not hasattr(index, "__index__"):
            raise LayerIndexError(f"A {what} index must be an integer; got {index!r}.")
        index = int(index)
        if not -n <= index < n:
            raise LayerIndexError(
                f"{what} index {index} is out of range: this model has {n} "
                f"(0..{n - 1}; negative indices count from the end)."
            )
        return index % n

    def layer_indices(self, indices: Iterable[int] | None, kind: str = "decoder") -> list[int]:
        """Normalized indices (all when ``None``), in the order given, duplicates refused."""
        n = len(self.layers) if kind == "decoder" else self.vision.depth
        if indices is None:
            return list(range(n))
        out = [self.layer_index(i, kind) for i in ([indices] if isinstance(indices, int) else indices)]
        if len(set(out)) != len(out):
            raise InputError(f"The {kind} layers {list(indices)} name some layer twice (after counting negative ones).")
        return out

    # ------------------------------------------------------------------ what the family allows

    @property
    def causal_text(self) -> bool:
        """Whether a text token influences no earlier position (not PaliGemma's prefix, not Mllama)."""
        return bool(self.spec.causal_text)

    @property
    def image_in_residual(self) -> bool:
        """Whether image tokens carry the image in the residual stream (False for Mllama)."""
        return bool(self.spec.image_in_residual)

    @property
    def positions_from_model(self) -> bool:
        """Whether position ids are multimodal and computed by the model (Qwen-VL's mRoPE)."""
        return bool(self.spec.mrope)

    def suffix_rerun_valid(self, batch: Any, start: int) -> bool:
        """Whether columns ``start:`` of ``batch`` can be rerun alone over the KV cache of its
        columns ``:start`` and give exactly what a full run gives there: a causal family, and
        no image token at or after ``start`` (the suffix gets no pixel inputs)."""
        if start <= 0 or start >= batch.width or not self.causal_text:
            return False
        return not bool(batch.layout.mask("vision")[:, start:].any())

    @property
    def cache_argument(self) -> str:
        """The forward's name for the KV cache (``cache`` in recent transformers, else ``past_key_values``)."""
        return "cache" if "cache" in inspect.signature(self.hf.forward).parameters else "past_key_values"

    @staticmethod
    def output_cache(output: Any) -> Any:
        """The KV cache a model output carries."""
        return output["cache"] if "cache" in output else output["past_key_values"]

    # ------------------------------------------------------------------ readout

    def readout(self, states: Float[Tensor, "... d_model"], *, grad: bool = False) -> Float[Tensor, "... vocab"]:
        """The model's own readout of residual states: final norm, unembedding, and the final
        logit soft-cap where the family has one (float32 logits).

        Args:
            grad: keep the graph to ``states`` (for training translators; the readout's own
                parameters stay frozen, and their flags are restored afterwards).
        """
        hf = self.hf
        norm = hf.get_submodule(self.spec.final_norm)
        head = hf.get_submodule(self.spec.lm_head)
        params = [*norm.parameters(), *head.parameters()]
        flags = [p.requires_grad for p in params]
        try:
            for p in params:
                p.requires_grad_(False)
            with torch.set_grad_enabled(grad):
                logits = head(norm(states.to(params[-1].device, params[-1].dtype)))
                cap = getattr(self.text_config, "final_logit_softcapping", None)
                if cap:
                    logits = torch.tanh(logits / cap) * cap
        finally:
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)
        return logits.float()

    # ------------------------------------------------------------------ attention

    def attention_readable(self, layer: int) -> bool:
        """Whether decoder ``layer``'s attention-function inputs can be read (a self-attention
        layer whose attention call was found at load time)."""
        sites = self.layers[layer]
        return not sites.is_cross_attention and type(sites.attn._module) in self._attention_calls

    def attention_call(self, layer: int) -> Any:
        """The nnsight source operation of decoder ``layer``'s attention-function call
        (``attention_interface(module, query, key, value, mask, ...)``), found at load time."""
        sites = self.layers[layer]
        if sites.is_cross_attention:
            raise InputError(f"Decoder layer {layer} is a cross-attention layer.")
        name = self._attention_calls.get(type(sites.attn._module))
        if name is None:
            raise SpecMismatchError(self._attention_problem or "No attention-function call found for this layer.")
        return getattr(sites.attn.source, name)

    def attention_columns(
        self, layer: int, kwargs: dict[str, Any], n_q: int, n_k: int | None = None
    ) -> tuple[Int[Tensor, " n_q"], Int[Tensor, " n_k"]]:
        """Absolute columns (positions in the padded batch) of an attention call's queries and keys.

        Call it with the attention module's keyword inputs as it is entered (the cache not yet
        updated with this call's tokens). The queries are the ``n_q`` columns after the cached
        ones; the keys are the columns the cache layer hands the attention (its mask sizes:
        with a sliding window, only the last ones), so key column ``j`` is absolute position
        ``offset + j``, at prefill, in a suffix rerun and at every decode step alike.

        Args:
            kwargs: the attention module's keyword inputs (``cache``/``past_key_values``, ``attention_mask``).
            n_q: query positions in this call.
            n_k: key positions the mask has (checked against the cache layout when given).
        """
        cache = kwargs.get("cache", kwargs.get("past_key_values", kwargs.get("past_key_value")))
        if cache is None:
            past, length, offset = 0, n_q, 0
        else:
            past = _seq_length(cache, layer)
            length, offset = _mask_sizes(cache, layer, n_q, past)
        if n_k is not None and n_k != length:
            raise SpecMismatchError(
                f"Layer {layer}'s attention received {n_k} key positions but its cache layout gives {length} "
                f"(offset {offset}); this cache type is not supported by attention interventions."
            )
        queries = torch.arange(past, past + n_q)
        keys = torch.arange(offset, offset + length)
        return queries, keys

    # ------------------------------------------------------------------ execution order

    def stage_rank(self, stage: str) -> int:
        """Rank of an execution stage (``embed``, ``vision``, ``projector``, ``decoder``,
        ``final``, ``output``) in this family's forward, measured once with a probe input."""
        static = {"decoder": 10, "final": 11, "output": 12}
        if stage in static:
            return static[stage]
        if self._stage_rank is None:
            object.__setattr__(self, "_stage_rank", self._measure_stage_order())
        return self._stage_rank[stage]

    def _measure_stage_order(self) -> dict[str, int]:
        order: list[str] = []
        modules = {"embed": self.embed._module, "vision": self.vision.root._module, "projector": self.projector._module}
        handles = [module.register_forward_pre_hook(lambda mod, args, name=name: order.append(name))
                   for name, module in modules.items()]
        try:
            probe = self.prepare("what is this ?", images=[Image.new("RGB", (64, 64), (120, 60, 30))])
            inputs = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in probe.inputs.items()}
            with torch.no_grad():
                self._module(**inputs)
        finally:
            for handle in handles:
                handle.remove()
        # first entries (Qwen-VL's projector runs inside the vision tower: entered after it)
        ranks = {name: i for i, name in enumerate(dict.fromkeys(order))}
        if len(ranks) != 3:
            raise SpecMismatchError(f"{self.spec.display_name}: the probe forward did not run {sorted(set(modules) - set(ranks))}.")
        return ranks

    # ------------------------------------------------------------------ vision tensors

    def vision_row_units(self, batch: Any, total: int) -> list[int]:
        """How many entries along dim 0 of a vision-tower or projector activation of ``batch``
        (``total`` in all) belong to each row: each row's share of the pixel inputs, checked."""
        weights = []
        for row in batch.rows:
            pixels = row.encoding.get("pixel_values")
            if pixels is None:
                weights.append(1 if self.spec.per_sample_fields else 0)
            elif pixels.dim() <= 2:
                weights.append(int(pixels.shape[0]))
            else:
                weights.append(int(torch.tensor(pixels.shape[:-3]).prod()))
        whole = sum(weights)
        units = [total * w // whole if whole else 0 for w in weights]
        if not whole or sum(units) != total or any(total * w % whole for w in weights):
            raise InputError(
                f"Cannot split this vision activation ({total} entries) among the batch's rows "
                f"(pixel inputs {weights}); collect it with batch_size=1."
            )
        return units


def _seq_length(cache: Any, layer: int) -> int:
    try:
        return int(cache.get_seq_length(layer))
    except TypeError:
        return int(cache.get_seq_length())


def _mask_sizes(cache: Any, layer: int, n_q: int, past: int) -> tuple[int, int]:
    getter = getattr(cache, "get_mask_sizes", None)
    if getter is None:
        return past + n_q, 0
    length, offset = getter(n_q, layer)
    return int(length), int(offset)
