"""WeightComparison: the tidy table of a weight comparison, its aggregates, exports and figures.

One row per tensor and step. Aggregates (per layer, component, region, or any mix) are exact
re-aggregations of the per-tensor sums: energies add, a group's relative norm is
``sqrt(sum energy / sum ||W||^2)``, its cosine is ``sum <D_s, D_t> / sqrt(sum E_s * sum E_t)`` (the
cosine of the concatenated update), its sign agreement a ratio of counts. Rows whose tensors hold
NaN/Inf are counted (``n_nonfinite``) and left out of every sum. Spectral means average exact
spectra only: rows of a randomized (top-k) spectrum are counted (``n_spectra_approx``) and left out,
so an aggregate never mixes exact and approximate values.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import InputError
from ..io import atomic_file, atomic_write_json
from ..results import Result
from .regions import REGIONS

#: Columns of :meth:`WeightComparison.to_frame`, in order.
COLUMNS: tuple[str, ...] = (
    "step", "from", "to", "tensor", "layer", "label", "region", "part", "component", "param", "shape", "numel",
    "dtype", "frob", "energy", "energy_share", "weight_norm", "rel_norm", "nonfinite",
    "spectral_norm", "stable_rank", "erank_s", "erank_s2", "topk_energy", "spectrum", "svd_mode", "svd_k",
    "svd_error_bound",
    "prev_step", "dot_prev", "cosine_prev", "n_changed_both", "n_sign_agree", "sign_agree_prev",
    "overlap_left_prev", "overlap_right_prev", "min_angle_left_prev", "min_angle_right_prev",
    "overlap_chance_left", "overlap_chance_right", "subspace_k",
)

_SPECTRAL_MEANS = ("stable_rank", "erank_s", "erank_s2", "topk_energy", "overlap_left_prev", "overlap_right_prev")
_ROW_ORDER = {"embed": 0, "vision_other": 1, "projector": 2, "final_norm": 3, "lm_head": 4, "other": 5}


class WeightComparison(Result):
    """Per-tensor deltas of a chain of checkpoints (see :func:`~vlm_probe.weights.compare_weights`).

    Columns (one row per tensor x step):

    * ``step``, ``from``, ``to``: the delta ``W_to - W_from``.
    * ``tensor`` (module-path name), ``layer`` (unified index: vision < 0, projector 0, LLM 1..N;
      empty for embed / final norm / lm_head / other), ``label`` (``V-2``, ``P``, ``L7``, ``embed``, ...),
      ``region`` (vision, projector, embed, early, mid, late, head, other), ``part`` (the family
      spec's region), ``component`` (q, k, v, o, qkv, gate, up, down, norm, projector, embed, lm_head,
      ...), ``param`` (weight, bias, ...), ``shape``, ``numel``, ``dtype`` (stored, of ``to``).
    * ``frob`` = ||D||_F, ``energy`` = ||D||_F^2, ``energy_share`` (of the step's total energy),
      ``weight_norm`` = ||W_from||_F, ``rel_norm`` = frob / weight_norm; ``nonfinite`` names NaN/Inf.
    * Spectra (matrices; tensors of 3+ dims as ``[dim0, rest]``): ``spectral_norm`` s_1, ``stable_rank``
      ||D||_F^2 / s_1^2, ``erank_s`` / ``erank_s2`` (exp of the entropy of s / sum s and of
      s^2 / sum s^2), ``topk_energy`` (top-k share of ||D||_F^2), ``spectrum`` (top-k s_i / s_1),
      ``svd_mode`` (exact, randomized, zero, none), ``svd_k`` (values behind these metrics),
      ``svd_error_bound`` (bound on ``|computed - true|`` of every singular value: float64 Gram
      rounding for exact, the residual bound for randomized). Randomized rows are approximate: their
      effective ranks are NaN (a top-k truncation has none) and aggregate means leave them out.
    * Against the previous step ``prev_step`` (same tensor): ``dot_prev``, ``cosine_prev``,
      ``sign_agree_prev`` (share of entries changed by both that moved the same way;
      ``n_sign_agree`` / ``n_changed_both``), ``overlap_left_prev`` / ``overlap_right_prev`` (mean
      squared cosine of the principal angles between the top-k left / right singular subspaces;
      ``overlap_chance_*`` = k / dim for random subspaces), ``min_angle_*_prev`` (degrees), ``subspace_k``.
    """

    kind = "weight_comparison"

    @classmethod
    def from_rows(cls, rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> WeightComparison:
        frame = pd.DataFrame(list(rows), columns=list(COLUMNS))
        frame["layer"] = frame["layer"].astype("Int64")
        for column in ("numel", "svd_k", "n_changed_both", "n_sign_agree", "subspace_k"):
            frame[column] = frame[column].astype("int64")
        totals = frame.groupby("step")["energy"].transform(lambda e: e[np.isfinite(e)].sum())
        frame["energy_share"] = frame["energy"] / totals.where(totals > 0)
        return cls(frame, meta)

    # ------------------------------------------------------------------ views

    @property
    def steps(self) -> list[str]:
        return list(self.meta.get("steps") or pd.unique(self.frame["step"]))

    def nonfinite(self) -> pd.DataFrame:
        """Rows of tensors that hold NaN or Inf (left out of every aggregate)."""
        return self.frame[self.frame["nonfinite"].fillna("") != ""].copy()

    def aggregate(self, by: str | Sequence[str] = "layer") -> pd.DataFrame:
        """Exact per-group re-aggregation for every step.

        Args:
            by: ``"layer"`` (one row per unified index, plus embed / final_norm / lm_head / ... rows),
                ``"component"``, ``"region"``, or a list of frame columns (e.g. ``["region", "component"]``).

        Returns:
            One row per step x group: ``n_tensors``, ``n_nonfinite``, ``n_spectra_approx`` (randomized
            rows, left out of the means), ``energy``, ``frob``, ``weight_norm``, ``rel_norm``,
            ``energy_share``, ``cosine_prev``, ``sign_agree_prev``, and the means over matrices with
            exact spectra of ``stable_rank``, ``erank_s``, ``erank_s2``, ``topk_energy``,
            ``overlap_left_prev``, ``overlap_right_prev`` (suffix ``_mean``).
        """
        keys = ["label"] if by == "layer" else [by] if isinstance(by, str) else list(by)
        keys = [k for k in keys if k != "step"]  # always a key
        frame = self.frame
        prev = frame[["tensor", "step", "energy"]].rename(columns={"step": "prev_step", "energy": "_prev_energy"})
        frame = frame.merge(prev, on=["tensor", "prev_step"], how="left")
        valid = frame["nonfinite"].fillna("") == ""
        pair = valid & np.isfinite(frame["dot_prev"])
        work = pd.DataFrame({
            "_nf": ~valid,
            "_e": frame["energy"].where(valid, 0.0),
            "_w": (frame["weight_norm"] ** 2).where(valid, 0.0),
            "_dot": frame["dot_prev"].where(pair, 0.0),
            "_pe": frame["_prev_energy"].where(pair, 0.0),
            "_ce": frame["energy"].where(pair, 0.0),
            "_agree": frame["n_sign_agree"].where(pair, 0),
            "_changed": frame["n_changed_both"].where(pair, 0),
            "_approx": valid & (frame["svd_mode"] == "randomized"),
            **{f"{c}_mean": frame[c].where(valid & (frame["svd_mode"] == "exact")) for c in _SPECTRAL_MEANS},
            "layer": frame["layer"], "region": frame["region"], "step": frame["step"],
            **{k: frame[k] for k in keys if k not in ("layer", "region", "step")},
        })
        grouped = work.groupby(["step", *keys], sort=False, dropna=False)
        table = grouped.agg(
            n_tensors=("_nf", "size"), n_nonfinite=("_nf", "sum"), n_spectra_approx=("_approx", "sum"),
            energy=("_e", "sum"), _w=("_w", "sum"),
            _dot=("_dot", "sum"), _pe=("_pe", "sum"), _ce=("_ce", "sum"), _agree=("_agree", "sum"),
            _changed=("_changed", "sum"), **{f"{c}_mean": (f"{c}_mean", "mean") for c in _SPECTRAL_MEANS},
            **({"layer": ("layer", "first"), "region": ("region", "first")} if by == "layer" else {}),
        ).reset_index()
        totals = table.groupby("step")["energy"].transform("sum")
        table["frob"] = np.sqrt(table["energy"])
        table["weight_norm"] = np.sqrt(table["_w"])
        table["rel_norm"] = np.sqrt(table["energy"] / table["_w"].where(table["_w"] > 0))
        table["energy_share"] = table["energy"] / totals.where(totals > 0)
        table["cosine_prev"] = table["_dot"] / np.sqrt((table["_pe"] * table["_ce"]).where(lambda x: x > 0))
        table["sign_agree_prev"] = table["_agree"] / table["_changed"].where(table["_changed"] > 0)
        table["n_nonfinite"] = table["n_nonfinite"].astype("int64")
        table["n_spectra_approx"] = table["n_spectra_approx"].astype("int64")
        front = ["step", *keys] + (["layer", "region"] if by == "layer" else [])
        stats = ["n_tensors", "n_nonfinite", "n_spectra_approx", "energy", "frob", "weight_norm", "rel_norm", "energy_share",
                 "cosine_prev", "sign_agree_prev", *(f"{c}_mean" for c in _SPECTRAL_MEANS)]
        table = table[front + [c for c in stats if c not in front]]
        if by == "layer":
            table["layer"] = table["layer"].astype("Int64")
            order = table["layer"].astype("float").fillna(1e9) + table["label"].map(_ROW_ORDER).fillna(0)
            table = table.assign(_order=order).sort_values(["step", "_order"], kind="stable").drop(columns="_order")
            table["step"] = pd.Categorical(table["step"], self.steps, ordered=True)
            table = table.sort_values("step", kind="stable")
            table["step"] = table["step"].astype(str)
        elif "region" in keys:
            table["_r"] = table["region"].map({r: i for i, r in enumerate(REGIONS)})
            table["_s"] = table["step"].map({s: i for i, s in enumerate(self.steps)})
            table = table.sort_values(["_s", "_r"], kind="stable").drop(columns=["_r", "_s"])
        return table.reset_index(drop=True)

    def by_layer(self) -> pd.DataFrame:
        """:meth:`aggregate` per unified layer index (plus embed / final_norm / lm_head rows)."""
        return self.aggregate("layer")

    def by_component(self) -> pd.DataFrame:
        """:meth:`aggregate` per component (q, k, v, o, gate, up, down, norm, ...)."""
        return self.aggregate("component")

    def by_region(self) -> pd.DataFrame:
        """:meth:`aggregate` per region (vision, projector, embed, early, mid, late, head, other)."""
        return self.aggregate("region")

    def summary(self) -> pd.DataFrame:
        """Compact per-region table: energy share, relative norm, cosine and sign agreement per step."""
        table = self.by_region()
        columns = ["step", "region", "n_tensors", "energy_share", "rel_norm", "cosine_prev", "sign_agree_prev"]
        if "stable_rank_mean" in table and table["stable_rank_mean"].notna().any():
            columns.append("stable_rank_mean")
        if table["n_nonfinite"].any():
            columns.append("n_nonfinite")
        if table["n_spectra_approx"].any():
            columns.append("n_spectra_approx")
        return table[columns]

    # ------------------------------------------------------------------ exports

    def to_parquet(self, path: str | os.PathLike) -> Path:
        """Write the per-tensor table to one parquet file (atomically)."""
        with atomic_file(path) as f:
            self.frame.to_parquet(f, index=False)
        return Path(path)

    def to_json(self, path: str | os.PathLike | None = None) -> dict[str, Any]:
        """The result as JSON (``meta``, ``tensors``, ``by_region``, ``by_layer``); written to ``path`` if given."""
        def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
            return json.loads(frame.to_json(orient="records", double_precision=15))

        doc = {
            "kind": self.kind,
            "meta": self.meta,
            "tensors": records(self.frame),
            "by_region": records(self.by_region()),
            "by_layer": records(self.by_layer()),
        }
        if path is not None:
            atomic_write_json(path, doc)
        return doc

    # ------------------------------------------------------------------ figures

    def plot(self, view: str = "overview", *, metric: str = "rel_norm", **kwargs: Any) -> Any:
        """A plotly figure.

        Args:
            view: ``"overview"`` (all three below), ``"layers"`` (per-layer curves of ``metric`` for
                each step), ``"regions"`` (energy share by region), ``"spectra"`` (mean normalised
                top-k spectrum per component and step).
            metric: column of :meth:`by_layer` for the layer curves (``rel_norm``, ``energy_share``,
                ``frob``, ``cosine_prev``, ``stable_rank_mean``, ...).
        """
        from . import plots

        views = {
            "overview": plots.overview,
            "layers": plots.layer_curves,
            "regions": plots.region_shares,
            "spectra": plots.component_spectra,
        }
        if view not in views:
            raise InputError(f"view must be one of {sorted(views)}, got {view!r}.")
        if view in ("overview", "layers"):
            kwargs["metric"] = metric
        return views[view](self, **kwargs)
