"""Writing that never touches a source and outlives a crash: outputs checked against their sources by real path,
written to a temporary sibling and renamed into place only when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from shortlvlm_vllm.errors import ShortLVLMError


def check_output_dir(dst: str | Path, overwrite: bool = False, sources: Iterable[str | Path] = ()) -> Path:
    """Refuse an output that exists (without overwrite), cannot be created, or overlaps a source; check early.

    Paths are compared after resolving symbolic links, so no spelling of a source can be written over.
    """
    dst = Path(dst).absolute()
    if dst.exists() and not overwrite:
        raise ShortLVLMError(f"output {dst} already exists: choose another path or pass --overwrite.")
    if dst.exists() and not dst.is_dir():
        raise ShortLVLMError(f"output {dst} exists and is not a directory.")
    for parent in dst.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ShortLVLMError(f"cannot write {dst}: {parent} is a file, not a directory.")
            break
    real = dst.resolve()
    for source in sources:
        source_real = Path(source).resolve()
        if real == source_real or (real.exists() and source_real.exists() and os.path.samefile(real, source_real)):
            raise ShortLVLMError(f"output {dst} is the source {source}: choose another output path.")
        if source_real in real.parents:
            raise ShortLVLMError(f"output {dst} lies inside the source {source}: choose a path outside it.")
        if real in source_real.parents:
            raise ShortLVLMError(f"output {dst} contains the source {source}: writing it would replace the source; "
                                 f"choose another output path.")
    return dst


@contextlib.contextmanager
def atomic_output_dir(dst: str | Path, overwrite: bool = False, sources: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a temporary sibling of `dst`; it becomes `dst` only if the block succeeds."""
    dst = check_output_dir(dst, overwrite, sources)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if dst.exists():
            old = dst.parent / f".{dst.name}.old-{os.getpid()}"
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old)
        else:
            tmp.rename(dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def portable_name(model: str | Path, base: str | Path = ".") -> str:
    """A model or checkpoint as results record it: a path relative to `base` (a results directory, the repository),
    a hub id or shipped model name ("toy") as given; never a path of the machine that ran it."""
    if not Path(model).exists():
        return str(model)
    return os.path.relpath(Path(model).absolute(), Path(base).absolute())
