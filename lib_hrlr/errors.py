"""User-facing errors: each names the field at fault and what is allowed."""

from __future__ import annotations


class HrlrError(Exception):
    """Base class of every error a user can cause; ``field`` names the input at fault."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class InvalidInput(HrlrError, ValueError):
    """A parameter outside what is allowed (size, overlap, sampler, region...)."""


class CheckpointError(HrlrError):
    """A model file that is missing, corrupt, unsafe or of an unknown architecture."""


class BudgetError(HrlrError):
    """The plan cannot fit in the memory budget."""


class DiskError(HrlrError):
    """A folder the run writes to (spill files, the output) is missing, read-only, RAM-backed
    or full; ``field`` names the option that chooses it (``spill_dir``, ``out``)."""


class Interrupted(Exception):
    """Raised inside a run when the caller asked it to stop."""
