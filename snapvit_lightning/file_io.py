"""Writing files: atomically (under a new hidden name, then renamed), never through a link, one export per folder at a time.

Every file this package writes goes through here: safetensors (:func:`write_safetensors`), other bytes
(:func:`write_file_atomic`), the staged names of an export (:func:`staging_path`), and the checks
that a folder can take them (:func:`check_writable`, :func:`folder_lock`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import Tensor

__all__ = [
    "FORMAT",
    "STAGING_SUFFIX",
    "check_writable",
    "folder_lock",
    "make_parent",
    "staging_path",
    "write_file_atomic",
    "write_safetensors",
]


#: The suffix of a file written under a hidden name beside its target, then renamed into place.
STAGING_SUFFIX = ".partial"

#: The ``format`` metadata of this package's elastic checkpoints and subnet files (:mod:`~snapvit_lightning.checkpoint`).
FORMAT = "snapvit-elastic"


def name_max(folder: Path) -> int:
    """The longest file name (bytes) ``folder``'s file system takes; 255 where it cannot say (a folder to be made)."""
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def hidden_beside(path: Path, tag: str) -> Path:
    """``.NAME{tag}`` beside ``path``; a name too long to take it keeps its suffix and the start of its stem."""
    name, room = path.name, name_max(path.parent) - 1 - len(tag.encode())
    if len(name.encode()) > room:
        stem = path.stem.encode()[: max(1, room - len(path.suffix.encode()))].decode(errors="ignore")
        name = stem + path.suffix
    return path.with_name(f".{name}{tag}")


def staging_path(path: Path) -> Path:
    """A new hidden name beside ``path`` (``.NAME.RANDOM.partial``) to write it under before the rename."""
    return hidden_beside(path, f".{secrets.token_hex(4)}{STAGING_SUFFIX}")


def write_file_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path``: under a new :func:`staging_path`, created there and never through a link, then renamed.

    A fixed temporary name (``.NAME.tmp-PID``) or writing ``path`` itself followed a symlink planted
    there, writing outside the folder; the rename replaces a link at ``path`` instead of following it.
    """
    tmp = staging_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _target_suffix(path: Path) -> str:
    """The suffix of the file ``path`` is written for: its own, or its target's for a :func:`staging_path`."""
    if path.suffix == STAGING_SUFFIX and path.name.startswith("."):
        return Path(path.name[1:].rsplit(".", 2)[0]).suffix
    return path.suffix


def write_safetensors(path: str | os.PathLike, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` (detached, contiguous, on the CPU) as a safetensors file, atomically.

    The file is written under a temporary name beside ``path``, then renamed, so ``path`` is never
    left half written; its folder is created. safetensors creates files readable by their owner
    only (mode 0600): the file gets the mode of any new file instead (``0666`` less the umask).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        TypeError: ``path`` is not a path, a value of ``tensors`` is not a tensor (numpy:
            ``torch.as_tensor``), or ``metadata`` is not string → string.
        ValueError: ``path`` does not end in ``.safetensors`` (the suffix says what the file is).
        IsADirectoryError: ``path`` is a folder.
        NotADirectoryError: A parent of ``path`` is a file.
        PermissionError: The file cannot be written (a read-only folder, a full disk).
    """
    from safetensors.torch import save_file

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file path (str or os.PathLike), got {type(path).__name__}")
    path = Path(path).expanduser()
    if _target_suffix(path).lower() != ".safetensors" and not path.is_dir():
        hint = "; ONNX: save_onnx() or `snapvit slice -o FILE.onnx`" if path.suffix == ".onnx" else ""
        raise ValueError(f"path: '{path}' must end in .safetensors (this writes a safetensors file{hint})")
    if path.is_dir():
        raise IsADirectoryError(f"'{path}' is a folder; give a .safetensors file name")
    _check_contents(tensors, metadata)
    make_parent(path)
    tmp = staging_path(path)  # a new random name: nothing can be planted there (a link safetensors would follow)
    umask = os.umask(0)
    os.umask(umask)
    try:
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=dict(metadata or {}))
        except Exception as err:  # safetensors' own error type: a read-only folder, a full disk
            if "I/O error" not in str(err):
                raise
            raise PermissionError(f"cannot write '{path}': {err}") from err
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _check_contents(tensors: Any, metadata: Any) -> None:
    """Refuse what safetensors would fail on deep inside, naming the entry."""
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensors: the name {name!r} must be a str, got {type(name).__name__}")
        if not isinstance(value, Tensor):
            hint = " (numpy: torch.as_tensor(value))" if type(value).__module__ == "numpy" else ""
            raise TypeError(f"tensors[{name!r}] must be a torch.Tensor, got {type(value).__name__}{hint}")
    for key, value in (metadata or {}).items():
        if not isinstance(key, str):
            raise TypeError(f"metadata: the key {key!r} must be a str, got {type(key).__name__}")
        if not isinstance(value, str):
            raise TypeError(f"metadata[{key!r}] must be a str (safetensors stores strings; json.dumps a value), "
                            f"got {type(value).__name__}")


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` while placing files in it (waits for another holder).

    Two exports into one folder then place their files one after the other, never interleaved (a
    report of one run beside the checkpoint of another). An advisory ``flock`` on the folder itself:
    no lock file is left behind, and a process that dies releases it. Where the platform or the
    file system has no such locks (Windows, some network file systems), nothing is locked.
    """
    try:
        import fcntl
    except ImportError:
        fcntl = None
    fd = os.open(folder, os.O_RDONLY) if fcntl is not None else None
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as err:
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def check_writable(folder: str | os.PathLike, argument: str) -> None:
    """Refuse a folder that cannot be created or written into, before any work that ends by writing there.

    The folder, or the nearest of its parents that exists, must be a folder this process may write
    into. A folder that does not exist yet is created and removed again: some file systems (``/proc``)
    let the permission check pass and refuse the ``mkdir``.

    Raises:
        NotADirectoryError: That path is a file.
        PermissionError: It is not writable (a read-only folder), or cannot be created there.
    """
    folder = Path(folder).expanduser()
    broken = next((p for p in (folder, *folder.parents) if p.is_symlink() and not p.exists()), None)
    if broken is not None:  # mkdir would meet it as an existing file, the write as "File exists"
        raise NotADirectoryError(f"{argument}: '{broken}' is a broken link (to '{os.readlink(broken)}'); "
                                 "remove it or point it at a folder")
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise NotADirectoryError(f"{argument}: '{existing}' is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{argument}: '{existing}' is not writable")
    if existing != folder:
        created = [folder, *folder.parents][: len(folder.parts) - len(existing.parts)]
        try:
            folder.mkdir(parents=True)
        except FileExistsError:  # made meanwhile by another process: not ours to remove
            return
        except OSError as err:
            _remove_empty(created)
            raise PermissionError(f"{argument}: cannot create '{folder}' ({err.strerror or err})") from None
        _remove_empty(created)
        return
    try:  # os.access passes for root everywhere, /proc included: a file made and removed says it for sure
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise PermissionError(f"{argument}: cannot write into '{folder}' ({err.strerror or err})") from None


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (innermost first) while they are empty; stop at one that is not."""
    for folder in folders:
        try:
            folder.rmdir()
        except FileNotFoundError:  # never made
            continue
        except OSError:
            break


def make_parent(path: Path) -> None:
    """Create ``path``'s folder; a file where a folder should be is named (mkdir says only "File exists")."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:
        blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), path.parent)
        raise NotADirectoryError(f"cannot write '{path}': '{blocking}' is a file, not a folder") from err
