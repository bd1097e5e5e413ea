"""The tracing layer: :class:`VLM`, an nnsight ``TransformersModel`` with standard sites.

``VLM`` *is* an nnsight model (``trace``, ``generate``, ``session``, ``edit``, the native
module tree at ``vlm.model...``) that also

* names the standard sites of every supported family (``vlm.layers[i].output``, ...),
* prepares prompts and images into a :class:`~vlm_probe.model.inputs.Batch` that knows
  where the image, question and answer tokens are, and
* batches several invokes that carry images into one forward (nnsight alone refuses).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import nnsight
import torch
from nnsight import TransformersModel
from PIL import Image

from ..arch import FamilySpec, get_spec
from ..errors import CheckpointError, InputError, NoOpInterventionError, SpecMismatchError
from .capabilities import Capabilities
from .inputs import Batch, Collator, ForwardInputs, Template, check_image_size, encode_row, render_prompt
from .sites import DecoderLayer, SiteList, VisionSites, cross_attention_layers, resolve

PromptLike = str | list[dict[str, Any]]


class VLM(Capabilities, TransformersModel):
    """A vision-language model wrapped for tracing, with standard sites and token layouts.

    Build it with :func:`vlm_probe.load`. Inside ``with vlm.trace(batch):`` read or write
    ``vlm.layers[i].output``, ``vlm.layers[i].attn.output``, ``vlm.vision.blocks[j].output``,
    ``vlm.projector.output``, ``vlm.lm_head.output`` and anything under ``vlm.model``.
    """

    def __init__(self, module: Any, *, processor: Any, spec: FamilySpec | None = None, **kwargs: Any) -> None:
        config = getattr(module, "config", None) if isinstance(module, torch.nn.Module) else None
        spec = spec or get_spec(config if config is not None else module)
        object.__setattr__(self, "spec", spec)
        super().__init__(
            module, processor=processor, tokenizer=processor.tokenizer, task="image-text-to-text", **kwargs
        )
        self._init_sites()

    # ------------------------------------------------------------------ sites

    def _init_sites(self) -> None:
        spec = self.spec
        set_ = object.__setattr__
        text_config = self.text_config
        cross = cross_attention_layers(spec, text_config)
        layer_list = resolve(self, spec.decoder_layers, spec, "decoder layer list")
        n_expected = getattr(text_config, "num_hidden_layers", None)
        if n_expected is not None and len(layer_list) != n_expected:
            raise SpecMismatchError(
                f"{spec.display_name} spec: {spec.decoder_layers!r} holds {len(layer_list)} layers but the "
                f"config says num_hidden_layers={n_expected}."
            )
        layers = [DecoderLayer(layer_list[i], i, spec, i in cross) for i in range(len(layer_list))]
        set_(self, "layers", SiteList(layers, "decoder layer"))
        set_(self, "embed", resolve(self, spec.embed, spec, "token embedding"))
        set_(self, "final_norm", resolve(self, spec.final_norm, spec, "final norm"))
        if spec.lm_head != "lm_head":
            set_(self, "lm_head", resolve(self, spec.lm_head, spec, "lm_head"))
        projectors = [resolve(self, p, spec, "projector") for p in spec.projector if "image_newline" not in p]
        set_(self, "projector", projectors[0])
        set_(self, "projectors", tuple(projectors))
        block_lists = [resolve(self, p, spec, "vision block list") for p in spec.vision_blocks]
        blocks = [b for blist in block_lists for b in blist]
        vision_root = resolve(self, spec.vision_root, spec, "vision tower")
        set_(self, "vision", VisionSites(vision_root, blocks, tuple(len(b) for b in block_lists)))
        if getattr(self.config, "image_token_id", None) is None:
            raise SpecMismatchError(f"{spec.display_name}: the config has no image_token_id.")
        set_(self, "collator", Collator(spec, int(self.tokenizer.pad_token_id)))
        self._init_capabilities()

    @property
    def hf(self) -> torch.nn.Module:
        """The underlying HF model (plain torch module, no tracing)."""
        return self._module

    @property
    def family(self) -> str:
        return self.spec.name

    @property
    def text_config(self) -> Any:
        config = self._module.config
        return getattr(config, self.spec.text_config_attr, None) or config

    @property
    def n_layers(self) -> int:
        """Number of LLM decoder layers."""
        return len(self.layers)

    @property
    def d_model(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def n_heads(self) -> int:
        return int(self.text_config.num_attention_heads)

    @property
    def n_kv_heads(self) -> int:
        return int(getattr(self.text_config, "num_key_value_heads", None) or self.n_heads)

    @property
    def head_dim(self) -> int:
        return int(getattr(self.text_config, "head_dim", None) or self.d_model // self.n_heads)

    @property
    def vocab_size(self) -> int:
        return int(self.text_config.vocab_size)

    @property
    def image_token_id(self) -> int:
        return int(self._module.config.image_token_id)

    @property
    def n_vision_blocks(self) -> int:
        return self.vision.depth

    def unified_index(self, site: str, index: int) -> int:
        """Unified layer index of a vision block (``site='vision'``), the projector, or a decoder
        layer (any other ``site``); negative block and layer indices count from the end."""
        if site == "vision":
            return self.layer_index(index, "vision") - self.vision.depth
        if site == "projector":
            return 0
        return self.layer_index(index) + 1

    def require_image_positions(self, what: str = "this intervention") -> None:
        """Raise where image positions carry no image content (Mllama's cross-attention design)."""
        if not self.spec.image_in_residual:
            raise NoOpInterventionError(
                f"{what} targets image-token positions, but in {self.spec.display_name} the image enters only "
                "through cross-attention layers: the image token carries no image content in the residual "
                "stream, so the intervention would change nothing. Intervene on the cross-attention layers "
                f"({sorted(cross_attention_layers(self.spec, self.text_config))}) or the vision tower instead."
            )

    # ------------------------------------------------------------------ inputs

    def prepare(
        self,
        prompts: PromptLike | Sequence[PromptLike],
        images: Image.Image | Sequence[Any] | None = None,
        *,
        answers: str | Sequence[str | None] | None = None,
        system: str | None = None,
        template: Template = "auto",
    ) -> Batch:
        """Prepare prompts and images as model inputs with a token layout.

        Args:
            prompts: one prompt (a string, or chat messages) or a list of them. A ``"<image>"``
                marker places an image; without markers the images go before the text.
            images: for one prompt, an image or a list of images; for a list of prompts, a list
                with one entry (image, list of images, or ``None``) per prompt.
            answers: text appended after the generation prompt (teacher forcing); its tokens
                form the ``answer`` group.
            system: a system prompt.
            template: ``"auto"`` applies the chat template when the processor has one;
                ``"chat"`` requires it; ``"raw"`` uses the prompt text as written.

        Returns:
            A :class:`Batch` (``batch.inputs``, ``batch.layout``).
        """
        single = isinstance(prompts, str) or (
            isinstance(prompts, (list, tuple)) and bool(prompts) and isinstance(prompts[0], dict)
        )
        if single:
            prompt_list: list[PromptLike] = [prompts]  # type: ignore[list-item]
            image_list = [images]
            answer_list = [answers] if not isinstance(answers, (list, tuple)) else list(answers)
        else:
            prompt_list = list(prompts)  # type: ignore[arg-type]
            if not prompt_list:
                raise InputError("prepare() got an empty list of prompts.")
            if images is None:
                image_list = [None] * len(prompt_list)
            elif isinstance(images, Image.Image) or len(images) != len(prompt_list):  # type: ignore[arg-type]
                raise InputError(
                    f"With {len(prompt_list)} prompts, images must be a list of {len(prompt_list)} entries "
                    "(an image, a list of images, or None for each prompt)."
                )
            else:
                image_list = list(images)  # type: ignore[arg-type]
            if answers is None or isinstance(answers, str):
                answer_list = [answers] * len(prompt_list)
            else:
                answer_list = list(answers)
        if len(answer_list) != len(prompt_list):
            raise InputError(f"Got {len(answer_list)} answers for {len(prompt_list)} prompts.")
        rows = []
        for prompt, imgs, answer in zip(prompt_list, image_list, answer_list):
            imgs = [] if imgs is None else [imgs] if isinstance(imgs, Image.Image) else list(imgs)
            for img in imgs:
                if not isinstance(img, Image.Image):
                    raise InputError(f"Images must be PIL images; got {type(img).__name__}.")
            for img in imgs:
                check_image_size(img, self.processor)
            imgs = [img.convert("RGB") if img.mode != "RGB" else img for img in imgs]
            rendered = render_prompt(
                self.processor, self.spec, prompt, len(imgs), system=system, answer=answer, template=template
            )
            rows.append(encode_row(self.processor, self.spec, self._module.config, rendered, imgs, answer))
        return Batch(rows, self.collator)

    # ------------------------------------------------------------------ nnsight batching

    def _as_batch(self, inputs: tuple, kwargs: dict) -> Batch | None:
        data = inputs[0] if inputs else None
        if isinstance(data, Batch):
            if data.collator != self.collator:
                raise InputError("This batch was prepared for another model family; prepare it with this model.")
            return data
        is_prompt = isinstance(data, str) or (
            isinstance(data, (list, tuple)) and bool(data) and isinstance(data[0], (str, dict))
        )
        if is_prompt and ("images" in kwargs or "answers" in kwargs or "system" in kwargs):
            return self.prepare(
                data,
                kwargs.pop("images", None),
                answers=kwargs.pop("answers", None),
                system=kwargs.pop("system", None),
            )
        return None

    def _batch_size(self, *inputs: Any, **kwargs: Any) -> int:
        data = inputs[0] if inputs else None
        if isinstance(data, Batch):
            return len(data)
        if isinstance(data, ForwardInputs):
            return data.rows
        if "images" in kwargs and isinstance(data, (list, tuple)) and data and not isinstance(data[0], dict):
            return len(data)
        if "images" in kwargs and data is not None:
            return 1
        return super()._batch_size(*inputs, **kwargs)

    def _batch(self, invokes: list, fn: Any) -> tuple:
        batches: list[Batch] = []
        forward: dict[str, Any] = {}
        if any(inputs and isinstance(inputs[0], ForwardInputs) for inputs, _ in invokes):
            if len(invokes) > 1:
                raise InputError("ForwardInputs go to the model untouched, so they need a trace with one invoke.")
            (data, *_), kwargs = invokes[0]
            return (), {**data.kwargs, **kwargs}
        for inputs, kwargs in invokes:
            kwargs = dict(kwargs)
            batch = self._as_batch(inputs, kwargs)
            if batch is None:
                if any(isinstance(b, Batch) for b in batches):
                    raise InputError("Mix of prepared batches and other inputs in one trace; prepare them all.")
                return super()._batch(invokes, fn)
            batches.append(batch)
            forward.update(kwargs)
        widths = {b.width for b in batches}
        if len(widths) > 1:
            raise InputError(
                f"The invokes of this trace have different sequence lengths ({sorted(widths)}), so left "
                "padding would shift their layouts' positions. Pad them to one width first: "
                "a, b = vlm_probe.align(a, b), or prepare them together with vlm.prepare([...])."
            )
        encoding, _ = self.collator([row for b in batches for row in b.rows])
        if getattr(fn, "__name__", "") == "generate":
            encoding.pop("position_ids", None)
        return (), {**encoding, **forward}

    # ------------------------------------------------------------------ self-check

    def check(self, batch: Batch | None = None, atol: float = 1e-4) -> dict[str, float]:
        """Validate the wrapper on this model with a probe input; raise on any failure.

        Checks that a trace with no intervention reproduces the plain forward, that saved layer
        outputs equal ``output_hidden_states``, that changing the image changes the logits,
        and that an edit at a standard site changes the output.
        """
        bad = nonfinite_parameters(self._module)
        if bad:
            raise CheckpointError(
                f"{self.spec.display_name} has NaN or Inf in {len(bad)} parameter tensor(s), e.g. {', '.join(bad[:3])}; "
                "every result from it would be NaN. Re-save or re-download the checkpoint (vlm-probe weights "
                "reports which tensors are affected)."
            )
        if batch is None:
            size = (64, 64)
            imgs = [Image.new("RGB", size, (200, 30, 30)), Image.new("RGB", size, (20, 40, 220))]
            batch = self.prepare(["what color is this ?"] * 2, [[imgs[0]], [imgs[1]]])
        report: dict[str, float] = {}
        inputs = {k: v.to(self.device) for k, v in batch.inputs.items()}
        with torch.no_grad():
            plain = self._module(**inputs, output_hidden_states=True)
        with self.trace(batch):  # reads in execution order: layers, then the head
            outs = nnsight.save([layer.output for layer in self.layers])
            logits = self.lm_head.output.save()
        report["trace_vs_plain"] = float((logits - plain.logits).abs().max())
        report["layers_vs_hidden_states"] = max(
            float((outs[i] - plain.hidden_states[i + 1]).abs().max()) for i in range(self.n_layers - 1)
        )
        report["image_effect"] = float((plain.logits[0, -1] - plain.logits[1, -1]).abs().max())
        with self.trace(batch):
            self.layers[0].mlp.output = self.layers[0].mlp.output * 0
            edited = self.lm_head.output.save()
        report["edit_effect"] = float((edited - plain.logits).abs().max())
        problems = [f"{name} is not finite ({value})" for name, value in report.items() if not math.isfinite(value)]
        if report["trace_vs_plain"] > atol:
            problems.append(f"a trace changed the logits by {report['trace_vs_plain']:.3g}")
        if report["layers_vs_hidden_states"] > atol:
            problems.append(f"layer outputs differ from hidden_states by {report['layers_vs_hidden_states']:.3g}")
        if report["image_effect"] == 0:
            problems.append("changing the image does not change the logits")
        if report["edit_effect"] == 0:
            problems.append("zeroing layer 0's MLP output does not change the logits")
        if problems:
            raise SpecMismatchError(f"{self.spec.display_name} failed its self-check: " + "; ".join(problems) + ".")
        return report

    def __repr__(self) -> str:
        return (
            f"VLM({self.spec.display_name}: {self.n_layers} layers, d_model={self.d_model}, "
            f"{self.vision.depth} vision blocks, path={getattr(self._module, 'name_or_path', '') or '<in memory>'})"
        )


def nonfinite_parameters(module: torch.nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers that hold NaN or Inf."""
    tensors = [*module.named_parameters(), *module.named_buffers()]
    return [name for name, t in tensors if t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t).all())]
