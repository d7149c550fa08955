"""Atomic checkpoint saving and safe loading.

Training a Collaboration of Experts (Zhang, Chen and Zhong, ICML 2022, arXiv:2107.03815) means K expert
networks plus a delegator, often for a long time: a checkpoint that is half-written when a job is killed, or
that silently replaced the previous good one, is costly. :func:`save_checkpoint` writes to a temporary file in
the destination's directory, flushes and ``fsync``-s it, and renames it over the destination with
:func:`os.replace` (atomic on POSIX and on Windows for a same-volume rename): at any moment the destination
holds either the old checkpoint or the complete new one. :func:`load_checkpoint` reads with
``torch.load(weights_only=True)``, which refuses to execute arbitrary pickled code.

Everything pycoe builds is an ``nn.Module`` with a plain ``state_dict``, so a checkpoint is a dict of
state_dicts, tensors (RNG states included) and Python scalars, strings, lists, tuples and dicts.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import uuid
from typing import Any

import torch

from pycoe._validation import check_bool, check_path

__all__ = ["save_checkpoint", "load_checkpoint"]

_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)


def _fsync_directory(directory: str) -> None:
    """Make the rename durable (POSIX); silently skipped where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(obj: dict, path: str | os.PathLike, *, verify: bool = True) -> None:
    """Save ``obj`` with :func:`torch.save`, atomically.

    The object is written to a hidden temporary file next to ``path`` (same directory, hence same file
    system), flushed and ``fsync``-ed, then renamed over ``path`` with :func:`os.replace`. If anything fails,
    the temporary file is removed and ``path`` is left untouched (the previous checkpoint, if any, survives).
    The new file gets the usual permissions for a new file (``0o666`` minus the umask).

    Args:
        obj: what to save, normally a dict of ``state_dict()`` s, tensors and Python scalars.
        path: destination file; its directory must exist.
        verify: before the rename, check that the written file only refers to types that
            :func:`load_checkpoint` (``torch.load(weights_only=True)``) accepts; if not, raise and keep the
            previous checkpoint. Only the pickle's type references are read, not the tensor data.

    Raises:
        TypeError: ``path`` is not a path.
        FileNotFoundError: the directory of ``path`` does not exist.
        ValueError: ``verify`` found types that ``weights_only`` loading would reject.
    """
    path = check_path("path", path, what="the checkpoint file")
    check_bool("verify", verify)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot save a checkpoint to {path!r}: directory {directory!r} does not exist")
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, _OPEN_FLAGS, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if verify:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(tmp)
            if unsafe:
                raise ValueError(
                    f"cannot save a checkpoint to {path!r}: it would refer to {', '.join(sorted(unsafe))}, which "
                    "torch.load(weights_only=True) rejects; save state_dicts, tensors and Python scalars instead "
                    "(or register the types with torch.serialization.add_safe_globals, or pass verify=False to skip "
                    "this check)"
                )
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync_directory(directory)


def _not_a_checkpoint(path: str, why: str) -> ValueError:
    return ValueError(f"{path!r} is not a pycoe/torch checkpoint ({why}; truncated or corrupt?)")


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` with ``torch.load(weights_only=True)``.

    Only tensors, state_dicts and plain Python containers and scalars (plus types registered with
    :func:`torch.serialization.add_safe_globals`) can be loaded, so a malicious file cannot run code.

    Args:
        path: the checkpoint file.
        map_location: passed to :func:`torch.load`; ``"cpu"`` by default, so a GPU checkpoint loads anywhere.

    Returns:
        The saved object.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a torch checkpoint at all (empty, truncated, corrupt, or another kind of
            file).
        pickle.UnpicklingError: a genuine torch checkpoint that refers to types ``weights_only`` loading
            rejects (the message names them).
    """
    path = check_path("path", path, what="the checkpoint file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    if os.path.getsize(path) == 0:
        raise _not_a_checkpoint(path, "the file is empty")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # Either a real checkpoint holding types that weights_only refuses, or bytes that are no checkpoint:
        # only the former gets the advice about trusted files.
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:
            unsafe = []
        if not unsafe:
            raise _not_a_checkpoint(path, "its contents cannot be read as a torch.save archive") from err
        raise pickle.UnpicklingError(
            f"refusing to load {path!r} with weights_only=True: it refers to {', '.join(sorted(unsafe))}, which "
            "are not tensors, state_dicts or plain Python containers. If you trust the file, allow those types "
            "with torch.serialization.add_safe_globals, or load it with torch.load(path, weights_only=False)."
        ) from err
    except (PermissionError, IsADirectoryError):
        raise
    except (RuntimeError, EOFError, KeyError, ValueError, IndexError, UnicodeDecodeError, OSError) as err:
        raise _not_a_checkpoint(path, f"torch.load failed with {type(err).__name__}") from err
