"""Logit lens and tuned lens: what each layer's residual stream predicts.

The logit lens reads a layer's state through the model's own final norm and unembedding
(``final_norm`` then ``lm_head``, plus the final logit soft-cap where the family has one), so
at the last layer it reproduces the model's logits exactly. *Lens transfer* reads one
checkpoint's states with another checkpoint's readout (IN's head on RL's states). The tuned
lens (Belrose et al. 2023) learns one affine translator per layer first.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from safetensors.torch import load_file, save
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import InputError
from ..interventions.positions import PositionSpec, positions_label
from ..io import atomic_directory, atomic_write_bytes
from ..model.inputs import Batch
from ..results import Result
from .collect import Activations, collect
from .metrics import kl


def _named(models: Any) -> dict[str, Any]:
    return dict(models) if isinstance(models, Mapping) or hasattr(models, "items") else {"model": models}


def readout(vlm: Any, states: Float[Tensor, "... d_model"]) -> Float[Tensor, "... vocab"]:
    """The model's own readout: final norm, unembedding, and the final logit soft-cap if any."""
    return vlm.readout(states)


class LensResult(Result):
    """Per (checkpoint, readout, sample, position, layer): KL to the final distribution, the
    top-k tokens, and the target token's rank and probability when targets were given."""

    kind = "logit_lens"

    def by_layer(self) -> pd.DataFrame:
        keys = ["checkpoint", "readout", "lens", "layer", "unified_layer"]
        keys = [k for k in keys if k in self.frame]
        cols = [c for c in ("kl_to_final", "target_prob", "target_rank") if c in self.frame]
        return self.frame.groupby(keys, sort=True)[cols].mean().reset_index()

    def overlay(self, batch: Batch, *, layer: int, sample: int = 0, checkpoint: str | None = None,
                value: str = "kl_to_final", image: int = 0, **kwargs: Any) -> go.Figure:
        """A lens run on ``positions="vision"`` drawn over the image: ``value`` per vision token
        at ``layer``, with each token's top readout token in the hover."""
        from .overlay import overlay_figure, vision_values

        if value not in self.frame:
            raise InputError(f"No column {value!r} in this lens result; value= takes one of "
                             f"{', '.join(c for c in self.frame.columns if self.frame[c].dtype.kind == 'f')}.")
        row = batch.layout[sample]
        vision = set(row.spans.get("vision", ()))
        frame = self.frame[(self.frame["sample"] == sample) & (self.frame["layer"] == layer)]
        if frame.empty:
            raise InputError(f"This lens result has no rows for sample {sample} at layer {layer}; it has layers "
                             f"{sorted(self.frame['layer'].unique().tolist())} and samples 0..{self.frame['sample'].max()}.")
        if not vision & set(frame["position"].tolist()):
            raise InputError(
                f"This lens result holds no vision-token positions (it was run at positions="
                f"{self.meta.get('positions', '?')!r}), so there is nothing to draw over the image. Run the lens "
                "with positions='vision' for an overlay."
            )
        frame = frame[frame["checkpoint"] == (checkpoint or frame["checkpoint"].iloc[0])]
        frame = frame[frame["readout"] == frame["checkpoint"]]
        values = vision_values(row, dict(zip(frame["position"], frame[value])))
        top = dict(zip(frame["position"], frame["top_tokens"].str.split(" | ").str[0]))
        labels = [top.get(p, "") for p in row.spans["vision"]]
        title = kwargs.pop("title", f"Logit lens at L{layer + 1}: {value} per vision token")
        return overlay_figure(batch.rows[sample].images[image], row, values, image_index=image, labels=labels,
                              title=title, **kwargs)

    def plot(self, value: str = "kl_to_final", **kwargs: Any) -> go.Figure:
        table = self.by_layer()
        fig = go.Figure()
        series = [k for k in ("checkpoint", "readout", "lens") if k in table and table[k].nunique() > 1] or ["checkpoint"]
        for name, part in table.groupby(series, sort=False):
            label = " / ".join(map(str, name if isinstance(name, tuple) else (name,)))
            fig.add_trace(go.Scatter(x=part["unified_layer"], y=part[value], mode="lines+markers", name=label))
        fig.update_layout(title=kwargs.get("title", f"Logit lens: {value} by layer"),
                          xaxis_title="layer (unified index)", yaxis_title=value, template="plotly_white", height=420)
        return fig


def _lens_rows(
    vlm_states: Activations,
    name: str,
    readers: Mapping[str, Any],
    final: Tensor,
    group: str,
    layers: list[int],
    targets: Tensor | None,
    top_k: int,
    tokenizer: Any,
    lens: str,
    translate: Any = None,
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    log_final = final
    samples = vlm_states.sample_index((name, "layer_out", layers[0], group))
    positions = vlm_states.position_index((name, "layer_out", layers[0], group))
    for reader_name, reader in readers.items():
        for layer in layers:
            states = vlm_states[(name, "layer_out", layer, group)]
            if translate is not None:
                states = translate(layer, states)
            logits = readout(reader, states)
            kls = kl(log_final, logits)
            probs = logits.softmax(-1)
            top = probs.topk(top_k, dim=-1)
            for r in range(logits.shape[0]):
                row = {"checkpoint": name, "readout": reader_name, "lens": lens, "sample": int(samples[r]),
                       "position": int(positions[r]), "layer": layer, "unified_layer": layer + 1,
                       "kl_to_final": float(kls[r]),
                       "top_tokens": " | ".join(tokenizer.convert_ids_to_tokens(top.indices[r].tolist())),
                       "top_prob": float(top.values[r, 0])}
                if targets is not None:
                    t = int(targets[samples[r]])
                    row["target_prob"] = float(probs[r, t])
                    row["target_rank"] = int((logits[r] > logits[r, t]).sum())
                rows.append(row)
    return rows


def logit_lens(
    models: Any,
    batch: Batch,
    *,
    positions: str = "last",
    layers: Sequence[int] | None = None,
    targets: Sequence[int] | Tensor | None = None,
    top_k: int = 5,
    transfer: bool = False,
    progress: bool = True,
) -> LensResult:
    """Logit lens per checkpoint, layer and position of a token group.

    Args:
        models: a VLM or a mapping name -> VLM.
        positions: a token group (``"last"``, ``"vision"``, ``"question"``, ``"all"``).
        targets: one token id per sample, for ``target_prob`` and ``target_rank``.
        transfer: also read every checkpoint's states with every other checkpoint's readout
            (lens transfer: IN's head on RL's states).
    """
    named = _named(models)
    rows: list[dict[str, Any]] = []
    target_ids = torch.as_tensor(targets).long().flatten() if targets is not None else None
    if target_ids is not None and target_ids.numel() != len(batch):
        raise InputError(f"Got {target_ids.numel()} targets for {len(batch)} samples; targets= takes one token id "
                         "per sample, in order.")
    for name, vlm in named.items():
        vocab = vlm.hf.get_output_embeddings().weight.shape[0]
        if target_ids is not None and not bool(((target_ids >= 0) & (target_ids < vocab)).all()):
            raise InputError(f"targets= holds token ids outside the vocabulary (0..{vocab - 1}): {target_ids.tolist()[:8]}.")
        chosen = list(range(vlm.n_layers)) if layers is None else list(layers)
        needed = sorted(set(chosen) | {vlm.n_layers - 1})
        acts = collect({name: vlm}, batch, sites=("layer_out",), layers=needed, groups=(positions,), progress=False)
        final = readout(vlm, acts[(name, "layer_out", vlm.n_layers - 1, positions)])
        readers = named if transfer else {name: vlm}
        rows += _lens_rows(acts, name, readers, final, positions, chosen, target_ids, top_k, vlm.tokenizer, "logit")
    return LensResult(pd.DataFrame(rows), {"positions": positions_label(positions), "transfer": transfer,
                                           "checkpoints": list(named)})


class TunedLens:
    """One affine translator per layer, trained so the readout of ``A_l h + b_l`` matches the
    model's final distribution (initialized to the identity: the logit lens)."""

    def __init__(self, d_model: int, layers: Sequence[int]) -> None:
        self.layers = list(layers)
        self.translators = {l: torch.nn.Linear(d_model, d_model) for l in self.layers}
        for lin in self.translators.values():
            torch.nn.init.eye_(lin.weight)
            torch.nn.init.zeros_(lin.bias)

    def __call__(self, layer: int, states: Tensor) -> Tensor:
        lin = self.translators[layer]
        with torch.no_grad():
            return lin(states.float())

    @classmethod
    def fit(
        cls,
        vlm: Any,
        acts: Activations,
        *,
        checkpoint: str = "model",
        group: str = "all",
        layers: Sequence[int] | None = None,
        steps: int = 200,
        lr: float = 1e-3,
        seed: int = 0,
        progress: bool = True,
    ) -> TunedLens:
        """Train translators on collected ``layer_out`` activations (the last layer gives the targets)."""
        chosen = list(range(vlm.n_layers - 1)) if layers is None else vlm.layer_indices(layers)
        final = readout(vlm, acts[(checkpoint, "layer_out", vlm.n_layers - 1, group)]).log_softmax(-1)
        lens = cls(vlm.d_model, chosen)
        torch.manual_seed(seed)
        bar = tqdm(total=len(chosen), desc="tuned lens", disable=not progress, unit="layer")
        for layer in chosen:
            states = acts[(checkpoint, "layer_out", layer, group)].float()
            lin = lens.translators[layer]
            opt = torch.optim.Adam(lin.parameters(), lr=lr)
            for _ in range(steps):
                opt.zero_grad()
                logits = vlm.readout(lin(states), grad=True)
                loss = torch.nn.functional.kl_div(logits.log_softmax(-1), final, log_target=True, reduction="batchmean")
                loss.backward()
                opt.step()
            bar.update(1)
        bar.close()
        return lens

    def save(self, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
        with atomic_directory(path, overwrite=overwrite) as tmp:
            tensors = {f"{l}.{k}": v.detach().contiguous() for l, lin in self.translators.items()
                       for k, v in lin.state_dict().items()}
            atomic_write_bytes(tmp / "translators.safetensors", save(tensors))
            (tmp / "lens.json").write_text(json.dumps({"layers": self.layers}))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TunedLens:
        path = Path(path)
        info = json.loads((path / "lens.json").read_text())
        tensors = load_file(path / "translators.safetensors")
        d = tensors[f"{info['layers'][0]}.weight"].shape[0]
        lens = cls(d, info["layers"])
        for l, lin in lens.translators.items():
            lin.load_state_dict({"weight": tensors[f"{l}.weight"], "bias": tensors[f"{l}.bias"]})
        return lens


def compare_lenses(
    vlm: Any, lens: TunedLens, batch: Batch, *, positions: str = "all", top_k: int = 5, name: str = "model"
) -> LensResult:
    """Logit lens and tuned lens side by side on ``batch`` (e.g. held-out samples)."""
    layers = lens.layers
    acts = collect({name: vlm}, batch, sites=("layer_out",), layers=sorted(set(layers) | {vlm.n_layers - 1}),
                   groups=(positions,), progress=False)
    final = readout(vlm, acts[(name, "layer_out", vlm.n_layers - 1, positions)])
    rows = _lens_rows(acts, name, {name: vlm}, final, positions, layers, None, top_k, vlm.tokenizer, "logit")
    rows += _lens_rows(acts, name, {name: vlm}, final, positions, layers, None, top_k, vlm.tokenizer, "tuned",
                       translate=lens)
    return LensResult(pd.DataFrame(rows), {"positions": positions, "compare": True})

