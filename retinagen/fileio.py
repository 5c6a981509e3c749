"""Atomic file writes: a reader never sees a half-written file, a crash leaves the old one.

Write to a temporary file in the same folder, fsync, then ``os.replace`` (atomic on POSIX and
Windows). On any failure the temporary file is removed and the error re-raised. An ``OSError`` is
re-raised naming the target (not the hidden temporary, and not ``None`` as a failed ``write()`` on
a full disk would), so `storage_error_message` and the CLI can say which file could not be written.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import os
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from retinagen.errors import BadInputError


def _default_mode() -> int:
    # mkstemp creates files 0600; give the result the mode a plain open() would (0666 minus umask).
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target`` atomically."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:  # unwritable folder, full disk: name the target, not a random temp name
        raise _naming_target(exc, target) from exc
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp_path, _default_mode())
        os.replace(tmp_path, target)
    except BaseException as exc:
        # The cleanup must not hide the original error (unlink can fail on the same broken disk).
        with suppress(OSError):
            tmp_path.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _naming_target(exc, target) from exc
        raise


def _naming_target(exc: OSError, target: Path) -> OSError:
    """``exc`` naming ``target`` when it named nothing (a failed ``write()``) or our temporary file.

    Same errno, hence the same ``OSError`` subclass (``PermissionError`` for EACCES, ...). An error
    that names some other file (a writer that failed to read its input) is returned unchanged.
    """
    if exc.errno is None:
        return exc
    if exc.filename is not None:
        named = Path(str(exc.filename))
        if named.parent != target.parent or not named.name.startswith(f".{target.name}."):
            return exc
    return OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(target))


# errno -> reason shown to the user. Only conditions of the machine, not bugs: any other OSError
# escaping a command is a bug and keeps its traceback (CLI exit code 1).
_STORAGE_REASONS: dict[int, str] = {
    errno.ENOSPC: "cannot write: no space left on the device (free some space or write elsewhere)",
    errno.EDQUOT: "cannot write: disk quota exceeded (free some space or write elsewhere)",
    errno.EROFS: "cannot write: read-only file system (write elsewhere)",
    errno.EFBIG: "cannot write: file too large for this file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def storage_error_message(exc: BaseException, writing: str | Path | None = None) -> str | None:
    """One line for an ``OSError`` caused by the machine (full disk, no permission, read-only file
    system) that names the file, e.g. ``"/out/ds.zip: cannot write: no space left on the device ..."``.

    ``writing``: what the caller was writing (a command's ``--out``), named when the error names no
    file (a failed ``write()`` on a plain file object carries none). None for any other exception
    (those are bugs).
    """
    if not isinstance(exc, OSError) or exc.errno not in _STORAGE_REASONS:
        return None
    if exc.filename is None:
        where = str(writing) if writing is not None else "(a file the system did not name)"
        return f"{where}: {_STORAGE_REASONS[exc.errno]}"
    where = Path(str(exc.filename))
    reason = _STORAGE_REASONS[exc.errno]
    if exc.errno in (errno.EACCES, errno.EPERM):
        # Name the folder too: the file may be a hidden temporary that the user never asked for.
        reason += f" (check that you may write to {where.parent} and that {where.name} is not read-only)"
    return f"{where}: {reason}"


def atomic_write_bytes(target: str | Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: str | Path, text: str) -> None:
    atomic_write_bytes(target, text.encode("utf-8"))


def atomic_write_json(target: str | Path, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(target, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def atomic_write_with(target: str | Path, writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp_path)`` and move the result onto ``target`` atomically."""
    with atomic_path(target) as tmp:
        writer(tmp)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in ``chunk``-byte blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_json(path: str | Path, what: str) -> Any:
    """Parse a JSON file; `BadInputError` naming the file and ``what`` it should be ("cannot read the
    factor map (...)", "not a JSON factor map (...)") when it cannot be read or parsed."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise BadInputError(path, f"cannot read the {what} ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInputError(path, f"not a JSON {what} ({exc})") from None


def csv_text(columns: Sequence[str], rows: Iterable[Sequence[Any] | Mapping[str, Any]]) -> str:
    """CSV text (``\n`` line ends): the header, then each row, a sequence in column order or a mapping by
    column name (a missing column is empty)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([row.get(c, "") for c in columns] if isinstance(row, Mapping) else row)
    return buf.getvalue()


def regular_file_stat(path: Path, error: Callable[[Path, str], Exception]) -> os.stat_result:
    """``path``'s stat when it is a non-empty regular file; else ``error(path, reason)`` is raised."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise error(path, "file does not exist") from None
    except OSError as exc:
        raise error(path, f"file cannot be accessed ({type(exc).__name__})") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(path, "not a regular file")
    if st.st_size == 0:
        raise error(path, "empty file (0 bytes)")
    return st
