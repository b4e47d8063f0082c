"""The project's own user-error classes. The CLI prints one of these as a single line and exits with its
`exit_code`; any other exception that escapes a command is a bug in mimtrain, and the CLI prints its traceback and
says so. So code that refuses a user's setting, path or file raises one of these, never a bare ValueError.

They live in the lowest layer (config) so that every layer above can raise them. Each also derives from the builtin
that callers caught before (ValueError; OSError for paths), so an `except ValueError` written against the older code
still catches them.
"""
from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user gave, explained in one line that names the key, path or file."""
    exit_code = 2


class ConfigError(UserError, ValueError):
    """A recipe, override or value that does not fit the schema or its declared range."""


class DataError(UserError, ValueError):
    """Input data that cannot serve the run: a missing, empty, unlabelled or unreadable folder or shard set, or class
    lists that do not match."""


class OutputPathError(UserError, ValueError, OSError):
    """An output location (output_dir, an export or shard folder) that cannot be created or written (a ValueError
    too, as the checks it replaced raised)."""


class BadFileError(UserError, ValueError):
    """A checkpoint, export or weights file that is truncated, foreign or unreadable. The message names the file and
    what was expected in it."""
    exit_code = 3


class MissingPathError(DataError, FileNotFoundError):
    """A file or folder named by the command or the config that does not exist."""
