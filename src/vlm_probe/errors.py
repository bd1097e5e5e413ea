"""One exception hierarchy for vlm_probe.

Every error says what was wrong and what to do about it. Catch :class:`VLMProbeError`
to handle anything the toolkit raises on purpose.
"""

from __future__ import annotations


class VLMProbeError(Exception):
    """Base class of every error vlm_probe raises on purpose."""


class UnknownFamilyError(VLMProbeError, KeyError):
    """A model whose family has no registered spec."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class SpecMismatchError(VLMProbeError):
    """A family spec that does not match the model it was applied to."""


class InputError(VLMProbeError, ValueError):
    """Bad inputs to prepare(), a trace or an analysis."""


class LayerIndexError(VLMProbeError, IndexError):
    """A layer, block or head index outside the model."""


class CheckpointError(VLMProbeError):
    """A checkpoint directory that cannot be read as asked."""


class CheckpointMismatchError(CheckpointError):
    """Checkpoints that were expected to share one architecture but do not."""


class MissingShardError(CheckpointError):
    """A sharded checkpoint whose index (or numbering) names shard files that are not there."""


class CorruptCheckpointError(CheckpointError):
    """A safetensors file (or config) whose header or index does not describe its contents."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle-only checkpoint, refused unless the caller opts in."""


class InterventionError(VLMProbeError):
    """An intervention that cannot do what was asked on this model."""


class NoOpInterventionError(InterventionError):
    """An intervention that would silently change nothing (e.g. image positions in Mllama)."""


class DatasetError(VLMProbeError):
    """A dataset file that cannot be read as asked."""


class MergePlanError(VLMProbeError):
    """An invalid merge or freezing plan."""


class RegionError(MergePlanError, InputError):
    """A region name or layer cuts that do not fit the model (see :mod:`vlm_probe.arch.regions`)."""


class GradingError(VLMProbeError, ValueError):
    """A gold answer (or grading option) that cannot be graded as asked."""


class GroupNameError(InputError, AttributeError):
    """A token-group name (``layout.visoin``) the layout does not have; the message lists those it has."""


class UnknownKeyError(InputError, KeyError):
    """A name looked up in a mapping (a checkpoint set, collected activations) that it does not hold;
    the message lists what it holds."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class RowIndexError(InputError, IndexError):
    """A batch row outside the batch; the message says how many rows there are."""
