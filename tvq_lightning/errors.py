"""Errors users see.

Every error the project raises on bad input is a :class:`TvqError` whose message is one line
that names the file or key at fault and what to do about it. The CLI prints it as
``tvq: error: <message>`` and exits with status 2; Python callers catch the subclass they care
about.
"""
from __future__ import annotations


class TvqError(Exception):
    """Base class: bad input, with a one-line message naming the culprit and the fix."""


class CheckpointError(TvqError):
    """A checkpoint cannot be read: missing, unreadable, pickled without opt-in, wrong prefix."""


class StoreError(TvqError):
    """A store is missing, truncated, of an unknown version, or inconsistent with its layout."""


class FingerprintMismatch(StoreError):
    """A store is used with pre-trained weights other than the ones it was built from."""


class IncompatibleWeights(TvqError):
    """Fine-tuned weights whose keys, shapes or dtypes differ from the pre-trained ones."""


class NonFiniteError(TvqError):
    """A task vector holds NaN or Inf."""


class QuantConfigError(TvqError, ValueError):
    """Invalid quantization settings (bits outside 1..8, bad group size, ...)."""


class BudgetError(TvqError, ValueError):
    """A bit budget that no allocation can meet."""


class OutputExistsError(TvqError):
    """An output path exists and ``overwrite`` was not asked for."""


class UsageError(TvqError):
    """A command line or config file the ``tvq`` commands cannot parse (unknown option, bad value)."""


class IntegrityError(StoreError):
    """Stored data does not match its recorded checksum (a flipped bit, a rewritten file)."""


class OutputError(TvqError):
    """An output cannot be written: disk full, permission denied, read-only file system, bad parent."""


class OptionError(TvqError, ValueError):
    """A merge option or task list out of range: non-finite, negative where it must not be, duplicated."""
