"""The shape every analysis result takes: a tidy frame, metadata, a plot, save and load.

Subclass :class:`Result`, set ``kind``, and implement :meth:`Result.plot`. ``save(path)``
writes ``path/`` with ``table.parquet`` and ``meta.json`` (atomically); ``Result.load``
reads any saved result back as its own class.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

from .errors import InputError
from .io import atomic_directory, atomic_write_json

_REGISTRY: dict[str, type[Result]] = {}


class Result:
    """A tidy table (one row per layer x position x sample x checkpoint ...) plus metadata."""

    kind: ClassVar[str] = "result"

    def __init__(self, frame: pd.DataFrame, meta: dict[str, Any] | None = None) -> None:
        self._frame = frame.reset_index(drop=True)
        self.meta: dict[str, Any] = dict(meta or {})

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _REGISTRY[cls.kind] = cls

    def to_frame(self) -> pd.DataFrame:
        """The tidy table (a copy)."""
        return self._frame.copy()

    @property
    def frame(self) -> pd.DataFrame:
        return self._frame

    def plot(self, **kwargs: Any) -> Any:
        """A plotly figure of the result."""
        raise NotImplementedError(f"{type(self).__name__} has no plot.")

    def save(self, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
        """Write ``path/table.parquet`` and ``path/meta.json`` atomically."""
        with atomic_directory(path, overwrite=overwrite) as tmp:
            self._frame.to_parquet(tmp / "table.parquet", index=False)
            atomic_write_json(tmp / "meta.json", {"kind": self.kind, "meta": self.meta})
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Result:
        """Read a saved result back (as the class that saved it)."""
        path = Path(path)
        meta_file = path / "meta.json"
        if not path.exists():
            raise InputError(f"{path} does not exist; pass the directory that Result.save() wrote.")
        if not meta_file.is_file():
            raise InputError(f"{path} is not a saved vlm_probe result (no meta.json); pass the directory that "
                             "Result.save() wrote.")
        info = json.loads(meta_file.read_text())
        target = _REGISTRY.get(info.get("kind"), cls)
        obj = target.__new__(target)
        Result.__init__(obj, pd.read_parquet(path / "table.parquet"), info.get("meta"))
        return obj

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rows={len(self._frame)}, columns={list(self._frame.columns)})"

    def _repr_html_(self) -> str:
        return f"<b>{type(self).__name__}</b> {len(self._frame)} rows" + self._frame.head(20).to_html()
