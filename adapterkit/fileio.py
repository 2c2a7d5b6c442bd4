"""Atomic writes: a crash or a full disk never leaves a half-written file or folder where a good one was.

Files and folders are written under a temporary name in the same directory, flushed, then renamed into place.
Temporary names are hidden and say who made them: `.<name>.<kind>-<host>-<pid>-<random>`, kind `tmp` (being
written), `old` (a complete folder moved aside while its replacement is renamed in) or `del` (being deleted).
A process killed with SIGKILL leaves them behind; `clean_stale` removes those whose process is gone (and puts
back a folder that a kill left moved aside), so they never pile up or block the next run.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile

from safetensors import SafetensorError

from .errors import AdapterkitError, first_line
from .faults import fault_point

# Written beside model_index.json by bases adapterkit builds: {"resolution": int, ...}. Named here, below base.py and tiny.py, so that both can
# use it without importing each other (base.py builds builtin:tiny-random through tiny.py).
BASE_INFO_FILE = "adapterkit_base.json"

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


def foreign_entries(folder: str, kept=frozenset()) -> str:
    """'a, b, c, ...': the first three visible entries of `folder` outside `kept`, "" when there are none (or no
    folder): what a writer that replaces the whole folder would delete (adapters/record.check_replaceable, demo-data)."""
    if not os.path.isdir(folder):
        return ""
    others = sorted(n for n in os.listdir(folder) if n not in kept and not n.startswith("."))
    return ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")


def check_pipeline_replaceable(folder: str, made_by: str, what: str, overwrite: bool = False, reads=(), option: str = "--output") -> None:
    """Refuse, before any work, to write a pipeline (`what`, say "the converted pipeline") into `folder` where it would
    replace something else, unless `overwrite` (session 22: convert-base, make-tiny-base and merge --output-pipeline
    replaced whatever --output held, an adapter or a dataset, and `merge --fuse --output-pipeline <its --base>`
    replaced the base every adapter was made for). Refused: the pipeline being read (`reads`, local paths), a
    pipeline another command made (its BASE_INFO_FILE's made_by is not `made_by`, or there is none), files that are
    no pipeline. Free: an absent or empty folder, and an earlier output of the same command (a rerun). `option`: the
    command's name for `folder`, which the message tells the user to change."""
    if overwrite or not os.path.isdir(folder):
        return
    fix = f"choose another {option}, or pass --overwrite"
    if any(os.path.isdir(r) and os.path.samefile(folder, r) for r in reads):
        raise AdapterkitError(f"{folder} is the pipeline this command reads; writing {what} there would replace it: {fix}")
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        try:
            with open(os.path.join(folder, BASE_INFO_FILE), encoding="utf-8") as f:
                held = json.load(f).get("made_by")
        except (OSError, ValueError, AttributeError):
            held = None
        if held != made_by:
            by = f" (made by {held})" if held else ""
            raise AdapterkitError(f"{folder} already holds a diffusers pipeline{by}; writing {what} there would replace it: {fix}")
        return
    shown = foreign_entries(folder)
    if shown:
        raise AdapterkitError(f"{folder} holds files that are not a pipeline ({shown}); writing {what} there would delete them: {fix}")


@contextlib.contextmanager
def atomic_folder(path: str):
    """Yield a temporary folder beside `path`; on success it replaces `path`, on failure it is removed.

    At every instant `path` is the complete old folder or the complete new one (see `_swap_in`), also under
    SIGKILL. Stale temporary folders of `path` left by killed processes are cleaned first (`clean_stale`).
    """
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise AdapterkitError(f"{path} exists and is not a folder; choose another output path")
    parent = _prepare_parent(path)
    clean_stale(parent, os.path.basename(path))
    tmp = tempfile.mkdtemp(prefix=_temp_prefix(path, "tmp"), dir=parent)
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700: give the folder the mode os.makedirs would have
        yield tmp
        _fsync_tree(tmp, 0o666 & ~_umask())
        fault_point(f"atomic_folder.{os.path.basename(path)}")
        _swap_in(tmp, path)
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
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path, "tmp"), dir=parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: give the file the mode open() would have
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


def _umask() -> int:
    """The process umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _reason(e: BaseException) -> str:
    strerror = getattr(e, "strerror", None)
    return strerror.strip().splitlines()[0] if strerror and strerror.strip() else first_line(e)


def write_json(path: str, data) -> None:
    with atomic_file(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


def _fsync_tree(folder: str, file_mode: int) -> None:
    """Flush every file to disk and give it `file_mode` (what open() would give it under the umask): writers such
    as safetensors' save_file leave 0600, which colleagues on a shared machine cannot read (issue 17.6)."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, file_mode)
            with open(path, "rb") as f:
                os.fsync(f.fileno())


# ------------------------------------------------------------------------------------------------ replacing, cleaning
_RENAME_EXCHANGE = 2  # linux/fs.h: renameat2 flag, swap two existing paths in one step
_AT_FDCWD = -100
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old|del)-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[^-]*$")


def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _temp_prefix(path: str, kind: str) -> str:
    """`.<name>.<kind>-<host>-<pid>-`: hidden, and naming its owner so that `clean_stale` knows when it is stale."""
    return f".{os.path.basename(path)}.{kind}-{_host()}-{os.getpid()}-"


def _swap_in(tmp: str, path: str) -> None:
    """Put the complete folder `tmp` at `path`, then delete what was there.

    Linux swaps the two names in one step (renameat2 RENAME_EXCHANGE), so `path` is never absent. Elsewhere
    (or on a file system without it) the old folder is renamed aside first; a kill between the two renames
    leaves `path` absent and the old folder at `.<name>.old-...`, which `clean_stale` moves back.
    """
    if not os.path.exists(path):
        os.rename(tmp, path)
        return
    if _exchange(tmp, path):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder (a kill here: clean_stale deletes it)
        return
    old = tempfile.mkdtemp(prefix=_temp_prefix(path, "old"), dir=os.path.dirname(path))
    os.rmdir(old)
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically; False where the OS or file system cannot (then the caller renames twice)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc without renameat2 (glibc < 2.28, some musl builds)
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), b)


def discard_folder(path: str) -> None:
    """Delete a folder so that it is never seen half deleted: hide it under a temporary name, then delete it."""
    hidden = tempfile.mkdtemp(prefix=_temp_prefix(path, "del"), dir=os.path.dirname(os.path.abspath(path)))
    os.rmdir(hidden)
    os.rename(path, hidden)
    fault_point(f"discard.{os.path.basename(path)}")
    shutil.rmtree(hidden, ignore_errors=True)


def clean_stale(folder: str, name: str | None = None) -> list[str]:
    """Remove the temporary files and folders in `folder` (of `name` only, when given) left by dead processes.

    Only entries made by adapterkit on this host whose process no longer runs are touched. A folder that a kill
    left moved aside (`.<name>.old-...` with `<name>` absent) is put back instead of deleted: it is the last
    complete version (a rename is atomic; it is deleted only once the new one is in place). Returns the paths
    removed or restored.
    """
    try:
        entries = sorted(os.listdir(folder))
    except OSError:
        return []
    done = []
    for entry in entries:
        match = _TEMP_NAME.match(entry)
        if not match or (name is not None and match["name"] != name) or match["host"] != _host() or _alive(int(match["pid"])):
            continue
        path, target = os.path.join(folder, entry), os.path.join(folder, match["name"])
        with contextlib.suppress(OSError):
            if match["kind"] == "old" and not os.path.lexists(target) and os.path.isdir(path):
                os.rename(path, target)
            elif os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
            done.append(path)
    return done


def _alive(pid: int) -> bool:
    if pid == os.getpid() or os.name != "posix":  # Windows' os.kill(pid, 0) would send CTRL_C_EVENT: never clean there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True
