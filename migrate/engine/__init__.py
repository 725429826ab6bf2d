"""The engine: save and restore a domain through the stream, live pre-copy, statistics.

- :func:`save` / :func:`restore`: sans-file, over a ``sink_write`` callable and an
  iterable of byte chunks;
- :func:`save_to_file` / :func:`file_chunks`: the file side (write, fsync, rename);
- :mod:`migrate.engine.state`: DomainState <-> stream records, in one place.
"""
from .files import (FileChunks, check_target, drop_stale_partial, file_chunks, partial_path, read_config,
                    save_to_file, save_to_stream)
from .restore import RestoreStats, restore
from .save import PAUSED_PHASES, Convergence, SaveCancelled, SaveError, SaveStats, SaveTimeout, save
from .state import RestoreError

__all__ = ["PAUSED_PHASES", "Convergence", "RestoreError", "RestoreStats", "SaveCancelled",
           "FileChunks", "SaveError", "SaveStats", "SaveTimeout", "check_target", "drop_stale_partial",
           "file_chunks", "partial_path", "read_config", "restore", "save", "save_to_file", "save_to_stream"]
