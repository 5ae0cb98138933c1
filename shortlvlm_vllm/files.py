"""Writing that never touches a source and outlives a crash: outputs checked against their sources by real path,
written to a temporary sibling and renamed into place only when complete."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from shortlvlm_vllm.errors import ShortLVLMError


def protected_paths(source: str | Path) -> list[Path]:
    """A source and every directory its linked files point into: writing any of them could change what it holds."""
    source = Path(source)
    linked = set()
    if source.is_dir():
        linked = {entry.resolve().parent for entry in source.iterdir() if entry.is_symlink()}
    return [source, *sorted(linked - {source.resolve()})]


def check_apart(dst: str | Path, sources: Iterable[str | Path]) -> None:
    """Refuse an output that is a source, lies inside one or contains one, whatever path (links, mounts) reaches it.

    A source that is not on disk (a hub id not downloaded, a dataset name) has nothing to overwrite and is skipped.
    """
    real = Path(dst).resolve()
    for source in sources:
        if not os.path.lexists(source):
            continue
        source_real = Path(source).resolve()
        if real == source_real or (real.exists() and source_real.exists() and os.path.samefile(real, source_real)):
            raise ShortLVLMError(f"output {dst} is the source {source}: choose another output path.")
        if source_real in real.parents or _inside_by_inode(real, source_real):
            raise ShortLVLMError(f"output {dst} lies inside the source {source}: choose a path outside it.")
        if real in source_real.parents or _inside_by_inode(source_real, real):
            raise ShortLVLMError(f"output {dst} contains the source {source}: writing it would replace the source; "
                                 f"choose another output path.")


def _inside_by_inode(path: Path, directory: Path) -> bool:
    """Whether an existing ancestor of `path` is `directory` by device and inode (a bind mount of it, say)."""
    if not directory.is_dir():
        return False
    return any(parent.exists() and os.path.samefile(parent, directory) for parent in path.parents)


def check_output_dir(dst: str | Path, overwrite: bool = False, sources: Iterable[str | Path] = (),
                     marker: str | None = None) -> Path:
    """Refuse an output that exists (without overwrite), cannot be created, or overlaps a source; check early.

    marker: a file every output of this kind holds (a checkpoint's config.json); --overwrite replaces only an empty
    directory or one holding it, never a directory of other files named by mistake.
    """
    dst = Path(dst).absolute()
    if dst.exists() and not overwrite:
        raise ShortLVLMError(f"output {dst} already exists: choose another path or pass --overwrite.")
    if dst.exists() and not dst.is_dir():
        raise ShortLVLMError(f"output {dst} exists and is not a directory.")
    _check_parent(dst)
    check_apart(dst, sources)
    if marker and dst.is_dir() and any(dst.iterdir()) and not (dst / marker).exists():
        raise ShortLVLMError(f"output {dst} holds files but no {marker}, so it is not an earlier output that "
                             f"--overwrite may replace: choose another path, or empty it yourself.")
    return dst


def check_output_file(path: str | Path, sources: Iterable[str | Path] = ()) -> Path:
    """Refuse an output file that is a directory, cannot be created, or overlaps a source."""
    path = Path(path).absolute()
    if path.is_dir():
        raise ShortLVLMError(f"output {path} is a directory; name a file.")
    _check_parent(path)
    check_apart(path, sources)
    return path


def _check_parent(path: Path) -> None:
    """The nearest existing ancestor must be a directory, or `path` cannot be created."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ShortLVLMError(f"cannot write {path}: {parent} is a file, not a directory.")
            return


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write a file so that a crash at any moment leaves the old file or the new one, never a part of either.

    The data go to a temporary sibling, are flushed to disk, and the sibling is renamed over `path`
    (a link at `path` is replaced, never written through).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # what a plain open() would give, not mkstemp's 0600
        with os.fdopen(fd, "wb") as out:
            out.write(data.encode() if isinstance(data, str) else data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
        _sync_directory(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2); False where the system cannot."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


@contextlib.contextmanager
def atomic_output_dir(dst: str | Path, overwrite: bool = False, sources: Iterable[str | Path] = (),
                      marker: str | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of `dst`; it becomes `dst` only if the block succeeds.

    An existing `dst` (with overwrite) is swapped with the new one in one step where the system allows it, so a
    crash leaves the old directory or the new one.
    """
    dst = check_output_dir(dst, overwrite, sources, marker)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if not dst.exists():
            tmp.rename(dst)
        elif not _exchange(tmp, dst):
            old = dst.parent / f".{dst.name}.old-{os.getpid()}"
            dst.rename(old)
            tmp.rename(dst)
            _remove(old)
        _sync_directory(dst.parent)
    finally:
        _remove(tmp)  # the new data on failure, the old after an exchange


def _remove(path: Path) -> None:
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def portable_name(model: str | Path, base: str | Path = ".") -> str:
    """A model or checkpoint as results record it: a path relative to `base` (a results directory, the repository),
    a hub id or shipped model name ("toy") as given; never a path of the machine that ran it."""
    if not Path(model).exists():
        return str(model)
    return os.path.relpath(Path(model).absolute(), Path(base).absolute())
