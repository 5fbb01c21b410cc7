"""memscan's one exception hierarchy: what the user can fix, with the exit code the CLI gives it.

    MemscanError                  exit 2 unless the class says otherwise
      ConfigError                 a config key or value memscan cannot accept (also a ValueError)
      InputError                  a path, shard spec, model or checkpoint that is missing or of the wrong kind
        ShardSpecError            a shard path, glob or brace pattern that matches nothing usable
        MissingPathError          a path that does not exist (also a FileNotFoundError)
      UnsafeCheckpointError       a pickle checkpoint refused without allow_pickle (also a PermissionError)
      ScanIncomplete              exit 3: some shard outputs could not be written; the rest is saved, rerun resumes

Each class also derives from the builtin a caller would have caught before it existed (ValueError,
FileNotFoundError, PermissionError, RuntimeError), so `except ValueError` around a loader keeps working.
Bad *data* (a corrupt image, a truncated shard) is never an exception: it is an error row.
"""

from __future__ import annotations


class MemscanError(Exception):
    """Something the user can fix; the message names the key or path and what would be accepted."""

    exit_code = 2


class ConfigError(MemscanError, ValueError):
    """A configuration value or key that memscan cannot accept."""


class InputError(MemscanError, ValueError):
    """A path, shard spec, model directory or checkpoint that cannot be used as given."""


class ShardSpecError(InputError):
    """A shard path, glob or brace pattern that matches nothing usable."""


class MissingPathError(InputError, FileNotFoundError):
    """A path the config or a command names that does not exist."""


class UnsafeCheckpointError(MemscanError, PermissionError):
    """A pickle checkpoint (it can run code when loaded) refused because allow_pickle is not set."""


class ScanIncomplete(MemscanError, RuntimeError):
    """Some shards have no output; the rest is saved and a rerun of the same command completes the scan."""

    exit_code = 3
