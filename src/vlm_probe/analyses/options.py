"""One options object for every sweep: memory budget, reuse, progress, generation, parallelism.

    from vlm_probe.analyses import RunOptions, sweep
    options = RunOptions(max_rows=32, progress=False, parallel="accelerate")
    sweep(vlm, clean, corrupt, options=options)

The keywords the sweeps took before (``max_rows=``, ``reuse_vision=``, ``progress=``,
``max_new_tokens=``, ``generation_config=``) still work and override the options object.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .parallel import Parallel, backend


@dataclass(frozen=True)
class RunOptions:
    """How a sweep runs (none of it changes the numbers, except the generation settings)."""

    max_rows: int = 64  #: rows per batched forward (variants x samples): the memory budget
    reuse: bool = True  #: reuse the unedited run (vision tower once, replay below edits, KV-suffix reruns)
    progress: bool = True  #: a progress bar per sweep
    max_new_tokens: int = 8  #: generated tokens for answer-level readouts
    generation_config: Any = None  #: an explicit greedy GenerationConfig (default: greedy_config(vlm, max_new_tokens))
    parallel: Parallel | str | None = None  #: None (one process) or "accelerate" (shard samples; see parallel)

    #: old keyword names -> fields
    ALIASES = {"reuse_vision": "reuse"}

    @classmethod
    def resolve(cls, options: RunOptions | None, legacy: Mapping[str, Any], what: str) -> RunOptions:
        """``options`` (default: all defaults) with the keywords a sweep was called with laid on top."""
        options = options if options is not None else cls()
        if not isinstance(options, RunOptions):
            raise TypeError(f"{what}() takes options=RunOptions(...); got {type(options).__name__}.")
        names = {f.name for f in dataclasses.fields(cls)}
        updates = {}
        for key, value in legacy.items():
            name = cls.ALIASES.get(key, key)
            if name not in names:
                raise TypeError(f"{what}() got an unexpected keyword argument {key!r}")
            if value is not None:
                updates[name] = value
        return dataclasses.replace(options, **updates) if updates else options

    @property
    def backend(self) -> Parallel:
        return backend(self.parallel)

    def record(self) -> dict[str, Any]:
        """The options that a result's metadata records."""
        return {"max_rows": self.max_rows, "reuse": self.reuse,
                "parallel": None if self.parallel is None else str(self.parallel)}
