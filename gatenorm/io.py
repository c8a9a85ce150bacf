"""Atomic file output: a temporary file beside the target, fsynced and renamed on success, removed on failure.

Temporary names carry the writing process's id (``.{target}.gatenorm-{pid}.*``), so the next write beside
the same target removes what a killed run left (its process is gone). Write errors (full disk, read-only
folder) become one `GatenormError` naming the target, not the temporary file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

#: errno values that mean "the destination cannot take this", whatever file the OS names.
_WRITE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})


def _umask() -> int:
    """The process's umask: from /proc on Linux (no change of state), else by setting it and back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0)
    os.umask(umask)
    return umask


def temp_prefix(target: Path, label: str = "") -> str:
    """The name prefix of this process's temporary files beside `target` (`label` tells them apart)."""
    return f".{Path(target).name}.gatenorm-{os.getpid()}.{label + '.' if label else ''}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_leftovers(target: Path) -> list[Path]:
    """Remove the temporary files and folders that killed gatenorm runs left beside `target`; return them."""
    target = Path(target)
    removed = []
    with contextlib.suppress(OSError):
        for entry in target.parent.glob(f".{glob_escape(target.name)}.gatenorm-*"):
            pid = entry.name[len(target.name) + len(".gatenorm-") + 1 :].split(".", 1)[0]
            if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def glob_escape(name: str) -> str:
    """`name` with glob metacharacters escaped."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _write_error(target: Path, e: OSError, tmp: Path | None = None):
    """The GatenormError for an OSError met while writing `target` (through `tmp`), or None if unrelated."""
    from gatenorm.errors import GatenormError

    names = {None, str(target), str(target.parent)}
    if tmp is not None:
        names.add(str(tmp))
    ours = isinstance(e.filename, str) and (
        (tmp is not None and e.filename.startswith(str(tmp)))
        or Path(e.filename).name.startswith(f".{target.name}.gatenorm-")
    )
    if e.errno in _WRITE_ERRORS or e.filename in names or ours:
        return GatenormError(f"cannot write {target}: {e.strerror or e}")
    return None


def fsync_path(path: Path) -> None:
    """Flush `path` (a file, or a folder and every file in it) to disk."""
    path = Path(path)
    paths = [path]
    if path.is_dir():
        paths = [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()] + [path]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system syncs folders
        fsync_path(folder)


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path in `target`'s folder; it becomes `target` (fsynced) if the block succeeds."""
    target = Path(target)
    tmp_path = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(target)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(target), suffix=".tmp", dir=target.parent)
        tmp_path = Path(tmp)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it private; give it a normal file's mode
        os.close(fd)
        yield tmp_path
        fsync_path(tmp_path)
        os.replace(tmp_path, target)
        _fsync_folder(target.parent)
    except OSError as e:
        error = _write_error(target, e, tmp_path)
        if error is None:
            raise
        raise error from None
    finally:
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)


def atomic_write_text(target: Path, text: str) -> None:
    """Write `text` to `target` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def atomic_dir(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `target`; it becomes `target` only if the block succeeds.

    Without `overwrite` an existing `target` is an error; with it, the old folder is replaced at the end.
    """
    from gatenorm.errors import GatenormError

    target = Path(target)
    if target.exists() and not overwrite:
        raise GatenormError(f"{target} already exists (pass --overwrite to replace it)")
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(target)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target), suffix=".tmp", dir=target.parent))
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; give it a normal folder's mode
        yield tmp
        fsync_path(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=temp_prefix(target), suffix=".old", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync_folder(target.parent)
    except OSError as e:
        error = _write_error(target, e, tmp)
        if error is None:
            raise
        raise error from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def scratch_file(beside: Path, label: str) -> Iterator[Path]:
    """A temporary file path in `beside`'s folder (same file system as the output), always removed."""
    beside = Path(beside)
    path = None
    try:
        remove_leftovers(beside)
        fd, name = tempfile.mkstemp(prefix=temp_prefix(beside, label), suffix=".tmp", dir=beside.parent)
        os.close(fd)
        path = Path(name)
        yield path
    except OSError as e:
        error = _write_error(beside, e, path)
        if error is None:
            raise
        raise error from None
    finally:
        if path is not None:
            path.unlink(missing_ok=True)


def refuse_overwriting_inputs(output: Path, inputs: dict[str, Path | None]) -> None:
    """Refuse, before anything is written, an `output` that is (or holds, or lies in) one of `inputs`.

    `inputs` maps a label ("the model", "the plan") to a path; None entries are skipped.
    """
    from gatenorm.errors import GatenormError

    out = Path(output).resolve()
    for label, path in inputs.items():
        if path is None or not Path(path).exists():
            continue
        src = Path(path).resolve()
        same = out == src or (out.exists() and os.path.samefile(out, src))
        if same or src in out.parents or (out.is_dir() and out in src.parents):
            raise GatenormError(f"-o {output} would overwrite {label} ({path}): choose another output")


def read_text_file(path: Path, what: str = "text file") -> str:
    """The UTF-8 text of the file at `path`; a GatenormError naming `what` if it is missing or not UTF-8."""
    from gatenorm.errors import GatenormError

    path = Path(path)
    if not path.is_file():
        raise GatenormError(f"no such {what}: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise GatenormError(f"{path} is not UTF-8 text (byte {e.start})") from None


def cache_dir() -> Path:
    """The user cache folder of gatenorm: ``$GATENORM_CACHE``, else ``$XDG_CACHE_HOME/gatenorm``, else
    ``~/.cache/gatenorm``."""
    if root := os.environ.get("GATENORM_CACHE"):
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gatenorm"


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of one file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def content_sha256(path: Path) -> str:
    """sha256 of a file, or of a folder's files (relative names and their sha256, in name order)."""
    if path.is_file():
        return file_sha256(path)
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(f"{f.relative_to(path).as_posix()}\0{file_sha256(f)}\n".encode())
    return digest.hexdigest()
