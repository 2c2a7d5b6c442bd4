"""Atomic writes: a crash or a full disk never leaves a half-written file or folder where a good one was.

Files and folders are written under a temporary name in the same directory, flushed, then renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

from safetensors import SafetensorError

from .errors import AdapterkitError

# safetensors reports a full disk or a file-size limit as SafetensorError("... I/O error: ..."), not OSError.
_WRITE_ERRORS = (OSError, SafetensorError)


def _prepare_parent(path: str) -> str:
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise AdapterkitError(f"cannot create output folder {parent}: {e.strerror}; choose a writable location") from e
    if not os.access(parent, os.W_OK):
        raise AdapterkitError(f"output folder {parent} is not writable; choose a writable location")
    return parent


@contextlib.contextmanager
def atomic_folder(path: str):
    """Yield a temporary folder beside `path`; on success it replaces `path`, on failure it is removed.

    An existing folder at `path` is moved aside, the new one renamed in, then the old one deleted, so at every
    instant `path` is either the complete old folder, absent (between two renames), or the complete new one.
    """
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise AdapterkitError(f"{path} exists and is not a folder; choose another output path")
    parent = _prepare_parent(path)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
            os.rmdir(old)
            os.rename(path, old)
        os.rename(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except _WRITE_ERRORS as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise AdapterkitError(f"cannot write {path}: {_reason(e)}; check free space and permissions") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "wb"):
    """Yield a file object for a temporary name beside `path`, renamed over `path` once closed successfully."""
    path = os.path.abspath(path)
    parent = _prepare_parent(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except _WRITE_ERRORS as e:
        _remove_quietly(tmp)
        raise AdapterkitError(f"cannot write {path}: {_reason(e)}; check free space and permissions") from e
    except BaseException:
        _remove_quietly(tmp)
        raise


def _reason(e: BaseException) -> str:
    text = getattr(e, "strerror", None) or str(e)
    return text.strip().splitlines()[0] if text.strip() else type(e).__name__


def write_json(path: str, data) -> None:
    with atomic_file(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


def _fsync_tree(folder: str) -> None:
    for root, _dirs, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
