"""Linear probes per layer, with shuffled-label controls, transfer and direction cosines.

A probe is fit on a train split of the *samples* (tokens of one sample never straddle the
split), on standardized features: multinomial logistic regression (L2, L-BFGS) for
categorical labels, ridge regression for numeric ones. The control task refits on labels
shuffled across samples; *selectivity* is accuracy minus control accuracy. A probe fit on one
checkpoint is also scored on the others' activations of the same samples (transfer), and the
cosine between checkpoints' probe directions is reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import InputError
from ..results import Result
from .collect import Activations


@dataclass
class LinearProbe:
    """A fitted probe: standardization, weights ``[classes or 1, d]`` and bias."""

    mean: Tensor
    scale: Tensor
    weight: Tensor
    bias: Tensor
    task: str
    classes: Tensor | None

    def decision(self, x: Tensor) -> Tensor:
        z = (x.float() - self.mean) / self.scale
        return z @ self.weight.T + self.bias

    def predict(self, x: Tensor) -> Tensor:
        out = self.decision(x)
        if self.task == "classification":
            return self.classes[out.argmax(-1)]  # type: ignore[index]
        return out[:, 0]

    def score(self, x: Tensor, y: Tensor) -> float:
        """Accuracy (classification) or R^2 (regression)."""
        pred = self.predict(x)
        if self.task == "classification":
            return float((pred == y).float().mean())
        y = y.float()
        ss_res = float(((pred - y) ** 2).sum())
        ss_tot = float(((y - y.mean()) ** 2).sum())
        return 1 - ss_res / ss_tot if ss_tot > 0 else float("nan")


def fit_probe(x: Float[Tensor, "n d"], y: Tensor, *, task: str = "classification", l2: float = 1e-2,
              max_iter: int = 100) -> LinearProbe:
    """Fit a logistic (classification) or ridge (regression) probe on standardized features."""
    x = x.float()
    mean, scale = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / scale
    n, d = z.shape
    if task == "regression":
        target = y.float()
        y_mean = target.mean()
        gram = z.T @ z + l2 * n * torch.eye(d)
        w = torch.linalg.solve(gram, z.T @ (target - y_mean))
        return LinearProbe(mean, scale, w[None, :], y_mean[None], task, None)
    classes, encoded = torch.unique(y, return_inverse=True)
    weight = torch.zeros(len(classes), d, requires_grad=True)
    bias = torch.zeros(len(classes), requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ weight.T + bias, encoded) + l2 * (weight**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return LinearProbe(mean, scale, weight.detach(), bias.detach(), task, classes)


def split_samples(samples: Sequence[int], test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train/test sample ids (split by sample, not by token)."""
    ids = np.unique(np.asarray(samples))
    rng = np.random.default_rng(seed)
    rng.shuffle(ids)
    n_test = max(1, int(round(len(ids) * test_size)))
    if n_test >= len(ids):
        raise InputError(f"Need more than {n_test} samples for a {test_size:.0%} test split; got {len(ids)}.")
    return ids[n_test:], ids[:n_test]


def direction_cosine(a: LinearProbe, b: LinearProbe) -> float:
    """Mean cosine between the two probes' per-class directions (in raw activation space)."""
    wa, wb = a.weight / a.scale, b.weight / b.scale
    if wa.shape != wb.shape:
        return float("nan")
    return float(torch.nn.functional.cosine_similarity(wa, wb, dim=-1).mean())


class ProbeResult(Result):
    """Per (checkpoint, site, layer, group, seed): held-out score, control score, selectivity,
    and per evaluation checkpoint the transfer score; plus direction cosines (``kind='cosine'``)."""

    kind = "probe"

    @property
    def scores(self) -> pd.DataFrame:
        """Score rows (``cosine_to`` empty): held-out, control, selectivity and transfer scores."""
        return self.frame[self.frame["cosine_to"] == ""].drop(columns=["cosine_to", "cosine"])

    def cosines(self) -> pd.DataFrame:
        """Cosine between the probe directions of two checkpoints, per layer and seed."""
        rows = self.frame[self.frame["cosine_to"] != ""]
        return rows[["train", "cosine_to", "site", "group", "layer", "unified_layer", "seed", "cosine"]]

    def by_layer(self) -> pd.DataFrame:
        frame = self.scores
        frame = frame[frame["train"] == frame["eval"]]
        return (frame.groupby(["train", "site", "group", "layer", "unified_layer"], sort=True)
                [["score", "control", "selectivity"]].mean().reset_index())

    def plot(self, value: str = "score", **kwargs: Any) -> go.Figure:
        frame = self.scores
        fig = go.Figure()
        for (train, ev), part in frame.groupby(["train", "eval"], sort=False):
            part = part.groupby("unified_layer")[value].mean().reset_index()
            label = train if train == ev else f"{train} probe on {ev}"
            fig.add_trace(go.Scatter(x=part["unified_layer"], y=part[value], mode="lines+markers", name=label,
                                     line={"dash": "solid" if train == ev else "dot"}))
        if value == "score" and "control" in frame:
            ctrl = frame[frame["train"] == frame["eval"]].groupby("unified_layer")["control"].mean().reset_index()
            fig.add_trace(go.Scatter(x=ctrl["unified_layer"], y=ctrl["control"], mode="lines", name="control task",
                                     line={"color": "gray", "dash": "dash"}))
        fig.update_layout(title=kwargs.get("title", f"Linear probe ({self.meta.get('task')}) by layer"),
                          xaxis_title="layer (unified index)", yaxis_title=value, template="plotly_white", height=420)
        return fig


def _check_collected(acts: Activations, site: str, group: str, checkpoints: Sequence[str] | None, n_labels: int) -> None:
    """The activations hold ``site`` x ``group`` for every asked checkpoint, and one label per sample."""
    keys = list(acts.keys())
    names = sorted({c for c, s, _, g in keys if s == site and g == group})
    if not names:
        held = sorted({(s, g) for _, s, _, g in keys})
        raise InputError(f"No activations of site={site!r}, group={group!r} were collected; these were: "
                         f"{', '.join(f'{s}/{g}' for s, g in held) or 'none'}.")
    unknown = [c for c in (checkpoints or ()) if c not in names]
    if unknown:
        raise InputError(f"checkpoints={list(checkpoints or ())}: no activations of {unknown}; collected: {names}.")
    samples = int(acts.sample_index((names[0], site, acts.layers(names[0], site, group)[0], group)).max()) + 1
    if n_labels != samples:
        raise InputError(f"Got {n_labels} labels for {samples} collected samples; pass one label per sample, in order.")


def probe_layers(
    acts: Activations,
    labels: Sequence[Any] | Tensor,
    *,
    site: str = "layer_out",
    group: str = "last",
    checkpoints: Sequence[str] | None = None,
    task: str | None = None,
    test_size: float = 0.25,
    seeds: Sequence[int] = (0, 1, 2),
    control: bool = True,
    l2: float = 1e-2,
) -> ProbeResult:
    """Probe every collected layer of ``group`` for a per-sample label.

    Args:
        acts: from :func:`~vlm_probe.analyses.collect.collect` (any ``reduce``; token rows
            inherit their sample's label).
        labels: one label per sample (ints/strings for classification, floats for regression).
        checkpoints: checkpoints to train on (default all); each probe is also scored on the others.
        task: ``"classification"`` or ``"regression"`` (inferred from the labels).
    """
    label_array = np.asarray(labels.tolist() if isinstance(labels, Tensor) else list(labels))
    if task is None:
        task = "regression" if label_array.dtype.kind == "f" else "classification"
    if task not in ("classification", "regression"):
        raise InputError(f"task={task!r}; use 'classification' or 'regression' (or leave it out to infer it).")
    if task == "classification":
        classes, codes = np.unique(label_array, return_inverse=True)
        if len(classes) < 2:
            only = f"every label is {classes[0]!r}" if len(classes) else "labels= is empty"
            raise InputError(f"A classification probe needs at least two classes, but {only}; pass labels that "
                             "vary across samples.")
        y_all = torch.as_tensor(codes, dtype=torch.long)
    else:
        y_all = torch.as_tensor(label_array.astype(float))
    _check_collected(acts, site, group, checkpoints, len(label_array))
    names = sorted({c for c, s, _, g in acts.keys() if s == site and g == group})
    checkpoints = list(checkpoints) if checkpoints is not None else names
    layers = acts.layers(names[0], site, group)
    rows = []
    for layer in layers:
        for seed in seeds:
            sample_ids = acts.sample_index((names[0], site, layer, group)).numpy()
            train_ids, test_ids = split_samples(sample_ids, test_size, seed)
            fitted: dict[str, LinearProbe] = {}
            for train in checkpoints:
                x = acts[(train, site, layer, group)]
                s = acts.sample_index((train, site, layer, group)).numpy()
                tr, te = np.isin(s, train_ids), np.isin(s, test_ids)
                y = y_all[s]
                probe = fit_probe(x[tr], y[tr], task=task, l2=l2)
                fitted[train] = probe
                ctrl = float("nan")
                if control:
                    perm = torch.as_tensor(np.random.default_rng(seed + 1000).permutation(len(y_all)))
                    y_ctrl = y_all[perm][s]
                    ctrl = fit_probe(x[tr], y_ctrl[tr], task=task, l2=l2).score(x[te], y_ctrl[te])
                for ev in names:
                    xe = acts[(ev, site, layer, group)]
                    se = acts.sample_index((ev, site, layer, group)).numpy()
                    te_e = np.isin(se, test_ids)
                    score = probe.score(xe[te_e], y_all[se][te_e])
                    rows.append({"train": train, "eval": ev, "site": site, "group": group, "layer": layer,
                                 "unified_layer": layer + 1, "seed": seed, "score": score,
                                 "control": ctrl if ev == train else float("nan"),
                                 "selectivity": score - ctrl if ev == train else float("nan"),
                                 "cosine_to": "", "cosine": float("nan")})
            for i, a in enumerate(checkpoints):
                for b in checkpoints[i + 1 :]:
                    rows.append({"train": a, "eval": a, "site": site, "group": group, "layer": layer,
                                 "unified_layer": layer + 1, "seed": seed, "score": float("nan"),
                                 "control": float("nan"), "selectivity": float("nan"), "cosine_to": b,
                                 "cosine": direction_cosine(fitted[a], fitted[b])})
    return ProbeResult(pd.DataFrame(rows), {"task": task, "site": site, "group": group, "seeds": list(seeds),
                                            "test_size": test_size})
