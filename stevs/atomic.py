"""Atomic file output: write to a temporary sibling, rename it into place when complete.

A killed job therefore never leaves a complete-looking output behind, and its temporary
file (``.{name}.tmp-*``) is removed by the next write of the same output. Finished files
get the usual permissions (0666 minus the umask), not the 0600 of a temporary file. A full
disk, a read-only or foreign folder is a :class:`stevs.errors.StevsOutputError` naming the
output: one line, no traceback, nothing left behind.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from stevs.errors import StevsOutputError

log = logging.getLogger(__name__)

_UMASK = os.umask(0)
os.umask(_UMASK)

#: errors of a write that are about the disk, never about the data written
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})
#: errors of creating or renaming a file in a folder one may not write to
PERMISSION_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
_DISK_WORDS = ("No space left on device", "Disk quota exceeded", "Read-only file system")


def is_disk_error(err: BaseException) -> bool:
    """True for a full disk, an exceeded quota or a read-only file system (also when a
    library such as HDF5 reports it only in its message)."""
    if isinstance(err, OSError) and err.errno in DISK_ERRNOS:
        return True
    return isinstance(err, OSError) and any(word in str(err) for word in _DISK_WORDS)


def output_error(path: str | os.PathLike, err: OSError) -> StevsOutputError:
    """One line naming the output and why it cannot be written."""
    reason = err.strerror or str(err)
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    if err.errno in (errno.ENOSPC, errno.EDQUOT) or "space" in reason or "quota" in reason:
        hint = f"free space on the disk of {folder}, then rerun"
    elif err.errno in PERMISSION_ERRNOS or isinstance(err, PermissionError):
        hint = f"the folder {folder} is not writable: choose another output folder"
    elif err.errno == errno.EISDIR:
        hint = "a folder of that name is in the way: give a file path"
    else:
        hint = "check the output folder"
    return StevsOutputError(path, f"cannot write this output: {reason}; {hint}")


def check_writable(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed and make sure files can be created in it.

    Long jobs call it first, so a read-only output folder stops them before the work,
    not at the first write hours later.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=".stevs-write-test-", dir=folder)
    except OSError as err:
        raise output_error(folder, err) from err
    os.close(handle)
    os.unlink(name)
    return folder


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the ``.{name}.tmp-*`` siblings a killed earlier write of ``path`` left."""
    path = Path(path)
    removed = []
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        try:
            stale.unlink()
        except OSError:
            continue
        removed.append(stale)
    if removed:
        log.info("%s: removed %d temporary file(s) of an interrupted write", path, len(removed))
    return removed


def _publish(tmp: Path, path: Path) -> None:
    """Give the finished temporary file normal permissions and rename it to ``path``."""
    os.chmod(tmp, 0o666 & ~_UMASK)
    os.replace(tmp, path)


def not_replaced(path: Path) -> StevsOutputError:
    """The error of an output path taken by something stevs does not replace."""
    return StevsOutputError(
        path,
        "exists and is not an earlier output of this kind, so it is not replaced: "
        "remove it or choose another output path",
    )


def is_hdf5_with(path: str | os.PathLike, *names: str) -> bool:
    """True for an HDF5 file holding every one of ``names`` (a group or dataset path, or a
    root attribute): how a writer recognises a file of its own kind it may replace."""
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            return all(name in handle or name in handle.attrs for name in names)
    except Exception:  # not HDF5, unreadable, damaged: not recognised as ours
        return False


def first_bytes(path: str | os.PathLike, size: int = 65536) -> bytes:
    """The first ``size`` bytes of a file (b"" when unreadable): how writers peek at a
    file before replacing it."""
    try:
        with open(path, "rb") as handle:
            return handle.read(size)
    except OSError:
        return b""


def is_tsv_with(path: str | os.PathLike, *columns: str) -> bool:
    """True for a tab-separated file whose header holds every one of ``columns``: how a
    table writer recognises an earlier table of its own kind."""
    head = first_bytes(path).split(b"\n", 1)[0].rstrip(b"\r")
    try:
        header = set(head.decode("utf-8").split("\t"))
    except UnicodeDecodeError:
        return False
    return bool(columns) and set(columns) <= header


def is_json_with(path: str | os.PathLike, *keys: str) -> bool:
    """True for a JSON object holding every one of ``keys``."""
    import json

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and all(key in data for key in keys)


#: the PNG text chunk ``Software`` of every picture stevs writes (how it knows its own)
PNG_SOFTWARE = "stevs"


def stevs_png_info() -> object:
    """PIL's ``pnginfo`` marking a picture as stevs's (``Software``: :data:`PNG_SOFTWARE`);
    matplotlib writers pass ``metadata={"Software": PNG_SOFTWARE}``."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Software", PNG_SOFTWARE)
    return info


def is_stevs_png(path: str | os.PathLike) -> bool:
    """True for a PNG whose ``Software`` text chunk is :data:`PNG_SOFTWARE`'s."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.format == "PNG" and str(image.info.get("Software", "")).startswith(
                PNG_SOFTWARE
            )
    except Exception:  # not an image, damaged: not recognised as ours
        return False


def check_replaceable(targets: dict[Path, Callable[[Path], bool]]) -> None:
    """Before any work: each existing output path must be a file its ``replaces`` recognises
    as an earlier output of its kind; the first that is not is an error naming it."""
    for path, replaces in targets.items():
        path = Path(path)
        if path.is_symlink() or (path.exists() and not (path.is_file() and replaces(path))):
            raise not_replaced(path)


@contextmanager
def atomic_path(
    path: str | os.PathLike, suffix: str = "", replaces: Callable[[Path], bool] | None = None
) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it to ``path`` if the block succeeds.

    The temporary file is removed when the block raises. ``suffix`` keeps an extension
    for writers that look at it (e.g. ``.h5ad``). Stale temporaries of ``path`` from a
    killed run are removed first. With ``replaces``, an existing file at ``path`` is
    replaced only if ``replaces(path)`` recognises it as an earlier output of the same kind;
    anything else is an error naming it, left untouched.
    """
    path = Path(path)
    if replaces is not None and path.is_file() and not replaces(path):
        raise not_replaced(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        handle, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=suffix, dir=path.parent)
    except OSError as err:
        raise output_error(path, err) from err
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        try:
            _publish(tmp, path)
        except OSError as err:
            raise output_error(path, err) from err
    except OSError as err:
        if is_disk_error(err):
            raise output_error(path, err) from err
        raise
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(
    path: str | os.PathLike, data: bytes, replaces: Callable[[Path], bool] | None = None
) -> Path:
    """Write ``data`` to ``path`` atomically (``replaces``: as :func:`atomic_path`'s)."""
    with atomic_path(path, replaces=replaces) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(
    path: str | os.PathLike, text: str, replaces: Callable[[Path], bool] | None = None
) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (``replaces``: as :func:`atomic_path`'s)."""
    with atomic_path(path, replaces=replaces) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def _make_folder(folder: Path, output: Path) -> None:
    """Create the folder of ``output``; a regular file in the way is an error naming it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:
        raise StevsOutputError(
            output, f"cannot write this output: {err.filename or folder} is a file, not a folder"
        ) from err
    except OSError as err:
        raise output_error(output, err) from err


@contextmanager
def atomic_dir(path: str | os.PathLike, replaces: Callable[[Path], bool]) -> Iterator[Path]:
    """Yield a not-yet-existing path inside a temporary sibling folder of ``path`` for a
    writer that makes a directory (a zarr store); renamed to ``path`` when the block
    succeeds, removed when it raises.

    Whatever is at ``path`` already is replaced only if ``replaces(path)`` says it is an
    earlier output of the same kind (e.g. a store stevs wrote); anything else (a folder of
    the user's, a file) is an error naming it, checked before the work, left untouched.
    """
    import shutil

    path = Path(path)
    _make_folder(path.parent, path)
    if path.is_symlink() or (path.exists() and not (path.is_dir() and replaces(path))):
        raise not_replaced(path)
    try:
        holder = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    except OSError as err:
        raise output_error(path, err) from err
    tmp = holder / path.name
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)
        if path.is_dir() and not path.is_symlink() and replaces(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(holder, ignore_errors=True)
