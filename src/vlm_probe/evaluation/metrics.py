"""Fine-grained metrics (as published) with transition tables and bootstrap intervals.

* ``M_vis``: share of general-VQA items answered correctly with the image **and** wrongly
  with a blank image of the same size (the answer needed the image);
* ``M_v2r``: share of math-VQA items answered correctly both with the image **and** with a
  blank image plus a text description of it;
* ``M_rea``: accuracy on text-only reasoning items.

Each paired metric comes with its full 2x2 transition table (first condition x second
condition, correct or wrong), and every rate and accuracy with a bootstrap confidence
interval over items (:func:`vlm_probe.stats.bootstrap`). Items that failed (unreadable
image, ...) in either condition are left out and counted in ``excluded``; the accuracies
shown with a paired metric count the same items as the metric (one population per metric).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..errors import InputError, VLMProbeError
from ..results import Result
from ..stats import Estimate, bootstrap

METRICS = ("M_vis", "M_v2r", "M_rea")


@dataclass(frozen=True)
class Transition:
    """Counts of a paired 2x2 table: items correct or wrong under conditions ``a`` and ``b``.

    Attributes:
        both: correct under a and b.
        a_only: correct under a, wrong under b.
        b_only: wrong under a, correct under b.
        neither: wrong under both.
    """

    both: int
    a_only: int
    b_only: int
    neither: int

    @property
    def n(self) -> int:
        return self.both + self.a_only + self.b_only + self.neither

    @property
    def a_accuracy(self) -> float:
        return (self.both + self.a_only) / self.n if self.n else float("nan")

    @property
    def b_accuracy(self) -> float:
        return (self.both + self.b_only) / self.n if self.n else float("nan")

    def as_dict(self) -> dict[str, int]:
        return {"both": self.both, "a_only": self.a_only, "b_only": self.b_only, "neither": self.neither}

    def to_frame(self, a: str = "a", b: str = "b") -> pd.DataFrame:
        """The table as a 2x2 frame (rows: ``a`` correct/wrong; columns: ``b`` correct/wrong)."""
        return pd.DataFrame(
            [[self.both, self.a_only], [self.b_only, self.neither]],
            index=pd.Index([f"{a} correct", f"{a} wrong"]),
            columns=pd.Index([f"{b} correct", f"{b} wrong"]),
        )


def _bools(values: Any) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype != bool:
        if not np.isin(array, [0, 1]).all():
            raise InputError("Correctness values must be booleans (or 0/1).")
        array = array.astype(bool)
    return array


def _paired(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray, int]:
    """Align two correctness vectors (Series by index, else by position); count the unmatched."""
    if isinstance(a, pd.Series) and isinstance(b, pd.Series):
        joined = pd.concat({"a": a, "b": b}, axis=1, join="inner")
        excluded = len(a.index.union(b.index)) - len(joined)
        return _bools(joined["a"].to_numpy()), _bools(joined["b"].to_numpy()), excluded
    a, b = _bools(a), _bools(b)
    if a.shape != b.shape:
        raise InputError(f"Paired conditions need one value per item each; got {a.shape} and {b.shape}.")
    return a, b, 0


def transition_table(a: Any, b: Any) -> Transition:
    """The 2x2 :class:`Transition` of paired correctness (aligned by index for Series)."""
    x, y, _ = _paired(a, b)
    return Transition(int((x & y).sum()), int((x & ~y).sum()), int((~x & y).sum()), int((~x & ~y).sum()))


def m_vis(image: Any, blank: Any, **bootstrap_options: Any) -> tuple[Estimate, Transition]:
    """M_vis: share correct with the image and wrong with a blank image, and the transitions."""
    x, y, _ = _paired(image, blank)
    return bootstrap((x & ~y).astype(float), **bootstrap_options), transition_table(x, y)


def m_v2r(image: Any, description: Any, **bootstrap_options: Any) -> tuple[Estimate, Transition]:
    """M_v2r: share correct with the image and with a blank image plus description, and the transitions."""
    x, y, _ = _paired(image, description)
    return bootstrap((x & y).astype(float), **bootstrap_options), transition_table(x, y)


def m_rea(text: Any, **bootstrap_options: Any) -> Estimate:
    """M_rea: accuracy on text-only reasoning items."""
    return bootstrap(_bools(text).astype(float), **bootstrap_options)


def correctness(rows: Any, condition: str) -> pd.Series:
    """``id -> correct`` for the items of ``condition`` that ran (failed items left out).

    ``rows``: an :class:`~vlm_probe.evaluation.runner.EvalRun` or its frame.
    """
    frame = rows.frame if hasattr(rows, "frame") else pd.DataFrame(rows)
    part = frame[(frame["condition"] == condition) & (frame["status"] == "ok")]
    if part.empty and not (frame["condition"] == condition).any():
        raise VLMProbeError(
            f"The run has no rows for condition {condition!r} (it has {sorted(frame['condition'].unique())}). "
            f"Evaluate with conditions=[..., {condition!r}]."
        )
    return pd.Series(part["correct"].astype(bool).to_numpy(), index=pd.Index(part["id"].to_numpy(), name="id"),
                     name=condition)


def _all_ids(rows: Any, conditions: Sequence[str]) -> set[Any]:
    """Ids with a row (run or failed) under any of ``conditions``."""
    frame = rows.frame if hasattr(rows, "frame") else pd.DataFrame(rows)
    return set(frame.loc[frame["condition"].isin(conditions), "id"])


def _row(model: str, metric: str, estimate: Estimate, transition: Transition | None = None,
         excluded: int = 0, conditions: tuple[str, str] | tuple[str] = (), population: str = "") -> dict[str, Any]:
    row: dict[str, Any] = {"model": model, "metric": metric, "value": estimate.value, "low": estimate.low,
                           "high": estimate.high, "n": estimate.n, "level": estimate.level, "excluded": excluded,
                           "conditions": "/".join(conditions), "population": population}
    for key in ("both", "a_only", "b_only", "neither"):
        row[key] = getattr(transition, key) if transition is not None else pd.NA
    return row


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    """Stable column types (nullable integers for counts), so saved and loaded tables compare equal."""
    for col in ("both", "a_only", "b_only", "neither", "n", "excluded"):
        frame[col] = frame[col].astype("Int64")
    return frame


class FineGrained(Result):
    """M_vis, M_v2r, M_rea and the accuracies behind them, one row per model x metric.

    Columns: ``model, metric, value, low, high, n, level, excluded, conditions, population``
    and the transition counts ``both, a_only, b_only, neither`` (for the paired metrics; ``a``
    is the image condition). ``metric`` is M_vis / M_v2r / M_rea or
    ``accuracy:<set>:<condition>``. The accuracies behind a paired metric are computed on that
    metric's items (those that ran under both conditions), so they add up with its 2x2 table;
    ``population`` says which items each row counts and ``excluded`` how many were left out.
    """

    kind = "fine_grained"

    def metrics(self) -> pd.DataFrame:
        """Only the three headline metrics (as percentages with intervals)."""
        frame = self.frame[self.frame["metric"].isin(METRICS)].copy()
        for col in ("value", "low", "high"):
            frame[col] = 100 * frame[col]
        return frame[["model", "metric", "value", "low", "high", "n"]].reset_index(drop=True)

    def transitions(self, metric: str, model: str | None = None) -> Transition:
        frame = self.frame[self.frame["metric"] == metric]
        if model is not None:
            frame = frame[frame["model"] == model]
        if len(frame) != 1 or pd.isna(frame["both"].iloc[0]):
            raise VLMProbeError(f"No single transition table for metric={metric!r}, model={model!r}.")
        r = frame.iloc[0]
        return Transition(int(r["both"]), int(r["a_only"]), int(r["b_only"]), int(r["neither"]))

    @classmethod
    def concat(cls, results: Sequence[FineGrained]) -> FineGrained:
        """Several models' results in one table (e.g. IN and RL, for one plot)."""
        frame = _typed(pd.concat([r.frame for r in results], ignore_index=True))
        return cls(frame, {"models": {r.meta.get("model", str(i)): r.meta for i, r in enumerate(results)}})

    def plot(self, **kwargs: Any) -> Any:
        """Grouped bars of M_vis / M_v2r / M_rea per model with confidence intervals."""
        import plotly.graph_objects as go

        frame = self.metrics()
        fig = go.Figure()
        for model, part in frame.groupby("model", sort=False):
            fig.add_bar(
                name=str(model), x=part["metric"], y=part["value"],
                error_y=dict(type="data", symmetric=False, array=part["high"] - part["value"],
                             arrayminus=part["value"] - part["low"]),
            )
        fig.update_layout(barmode="group", yaxis_title="% of items", title="Fine-grained metrics", **kwargs)
        return fig


def fine_grained_metrics(
    *,
    general: Any = None,
    math: Any = None,
    reasoning: Any = None,
    model: str = "model",
    n_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> FineGrained:
    """Compute the fine-grained metrics from evaluation runs.

    Args:
        general: a run (or its rows) of general VQA with conditions ``image`` and ``blank`` -> M_vis.
        math: a run of math VQA with conditions ``image`` and ``description`` -> M_v2r.
        reasoning: a run of text-only items (condition ``text``) -> M_rea.
        model: the label of this model in the table.

    Returns:
        A :class:`FineGrained` result (metrics, accuracies, transitions, intervals).
    """
    options = {"n_resamples": n_resamples, "level": level, "seed": seed}
    rows: list[dict[str, Any]] = []
    paired: Mapping[str, tuple[Any, str, str, Any]] = {
        "M_vis": (general, "image", "blank", m_vis),
        "M_v2r": (math, "image", "description", m_v2r),
    }
    for metric, (run, a, b, fn) in paired.items():
        if run is None:
            continue
        ca, cb = correctness(run, a), correctness(run, b)
        estimate, table = fn(ca, cb, **options)
        excluded = len(_all_ids(run, [a, b])) - table.n
        population = f"items run under both {a} and {b}"
        rows.append(_row(model, metric, estimate, table, excluded, (a, b), population))
        name = "general" if metric == "M_vis" else "math"
        together = pd.concat({a: ca, b: cb}, axis=1, join="inner")  # one population per metric: its 2x2 table's
        for condition in (a, b):
            values = together[condition].astype(bool)
            rows.append(_row(model, f"accuracy:{name}:{condition}", bootstrap(values.astype(float), **options),
                             excluded=excluded, conditions=(condition,), population=population))
    if reasoning is not None:
        text = correctness(reasoning, "text")
        rows.append(_row(model, "M_rea", m_rea(text, **options),
                         excluded=len(_all_ids(reasoning, ["text"])) - len(text), conditions=("text",),
                         population="items run under text"))
    if not rows:
        raise VLMProbeError("Give at least one of general=, math=, reasoning= to compute fine-grained metrics.")
    meta = {"model": model, "bootstrap": options}
    for key, run in (("general", general), ("math", math), ("reasoning", reasoning)):
        if run is not None and hasattr(run, "meta"):
            meta[key] = run.meta
    return FineGrained(_typed(pd.DataFrame(rows)), meta)
