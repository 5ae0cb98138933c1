"""Reading a benchmark's table from the hub or from a local copy in the same schema, and drawing subsets.

A local copy is either a directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`, or parquet /
JSON files (a file, or a directory of them) that `datasets.load_dataset` reads. Either way the columns must be
the hub's, so one loader serves both and a missing column is caught before any request is sent.
"""

from __future__ import annotations

import io
import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from shortlvlm_vllm.errors import ShortLVLMError
from shortlvlm_vllm.evaluation.benchmarks.base import Benchmark

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json"}


class HubBenchmark(Benchmark):
    """A benchmark stored as one table on the hub: where it lives and which columns it reads, declared as data."""

    config: str | None = None  # the hub config ("en" for MMBench); None for a dataset with a single one
    split: str
    columns: tuple[str, ...]  # the columns the benchmark reads; a source without one of them is refused
    # ids the table lived under before: tried, with a warning, when `hub_id` cannot be loaded (lmms-eval moved its
    # image benchmarks from lmms-lab/* to lmms-lab-encoder/* in its PR #1416; the old ids redirect for now)
    legacy_hub_ids: tuple[str, ...] = ()

    def open(self, source: str | None = None) -> datasets.Dataset:
        """The benchmark's table from `source` (default: the hub), its columns checked."""
        return open_table(
            source, benchmark=self.name, hub_id=self.hub_id, config=self.config, split=self.split,
            columns=self.columns, legacy_hub_ids=self.legacy_hub_ids,
        )


def open_table(
    source: str | None, *, benchmark: str, hub_id: str, config: str | None, split: str, columns: Sequence[str],
    legacy_hub_ids: Sequence[str] = (),
) -> datasets.Dataset:
    """One split of a benchmark from the hub (`source` None: `hub_id`, then the legacy ids) or a local path, refused
    when it lacks a column."""
    import datasets

    if source is None:
        where = f"{hub_id}" + (f" (config {config})" if config else "") + f" split {split}"
        failure: Exception | None = None
        for name in (hub_id, *legacy_hub_ids):
            try:
                table = datasets.load_dataset(name, config, split=split)
            except Exception as exc:  # network, auth and hub errors come in many types; all mean the same here
                failure = failure or exc
                continue
            if name != hub_id:
                log.warning("%s: loaded from its old id %s, which lmms-eval no longer relies on; %s failed: %s",
                            benchmark, name, hub_id, failure)
                where = where.replace(hub_id, name, 1)
            break
        else:
            raise ShortLVLMError(
                f"cannot load {benchmark} from the hub ({where}): {type(failure).__name__}: {failure}. Without "
                f"network access, pass a local copy with --data PATH (a save_to_disk directory or parquet/JSON files "
                f"with the columns of {hub_id})."
            ) from failure
    else:
        where = str(source)
        table = _load_local(Path(source), benchmark, split)
    missing = [column for column in columns if column not in table.column_names]
    if missing:
        raise ShortLVLMError(
            f"{benchmark} data at {where} lacks column(s) {', '.join(missing)} (it has {', '.join(table.column_names)})"
            f"; pass a copy of {hub_id} with its column names."
        )
    log.info("%s: %d rows from %s", benchmark, len(table), where)
    return table


def _load_local(path: Path, benchmark: str, split: str) -> datasets.Dataset:
    import datasets

    if not path.exists():
        raise ShortLVLMError(
            f"{benchmark} data path {path} does not exist; pass an existing save_to_disk directory or parquet/JSON "
            "files in the hub schema with --data PATH, or leave --data out to load from the hub."
        )
    builder = FILE_BUILDERS.get(path.suffix.lower()) if path.is_file() else None
    if path.is_file() and builder is None:
        raise ShortLVLMError(
            f"{benchmark} data file {path} is neither parquet nor JSON; pass a .parquet/.json/.jsonl file "
            "or a save_to_disk directory."
        )
    try:
        if builder:
            loaded = datasets.load_dataset(builder, data_files=str(path))
        elif (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            loaded = datasets.load_from_disk(str(path))
        else:
            loaded = datasets.load_dataset(str(path))
    except Exception as exc:  # datasets raises many types for unreadable data; the user needs the path and cause
        raise ShortLVLMError(
            f"cannot read {benchmark} data at {path}: {type(exc).__name__}: {exc}. Pass a save_to_disk directory "
            "or parquet/JSON files in the hub schema."
        ) from exc
    return pick_split(loaded, split, path)


def pick_split(loaded: datasets.Dataset | datasets.DatasetDict, split: str, where: Path) -> datasets.Dataset:
    """The requested split of a DatasetDict, or its only split (local files name splits as they like)."""
    import datasets

    if isinstance(loaded, datasets.Dataset):
        return loaded
    if split in loaded:
        return loaded[split]
    if len(loaded) == 1:
        return next(iter(loaded.values()))
    raise ShortLVLMError(
        f"{where} holds splits {', '.join(loaded)} but not {split!r}; pass the directory of the {split!r} split."
    )


def draw(n: int, limit: int | None, seed: int) -> list[int]:
    """`limit` of the positions 0..n-1 drawn with `seed`, in dataset order; all of them without a limit."""
    if limit is not None and limit < 1:
        raise ShortLVLMError(f"limit {limit} asks for no items; use a limit of at least 1, or none for all.")
    if limit is None or limit >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), limit))


def text_columns(table: datasets.Dataset, columns: Sequence[str]) -> list[dict[str, Any]]:
    """The rows of a few columns, without decoding any image: what grouping and filtering need."""
    return table.select_columns(list(columns)).to_list()


def to_image(value: Any, where: str) -> Image.Image:
    """An RGB image from what a table cell holds: a decoded image, {"bytes", "path"}, or a file path."""
    if isinstance(value, dict):
        value = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else value.get("path")
    if isinstance(value, str):
        value = Image.open(value)
    if not isinstance(value, Image.Image):
        raise ShortLVLMError(f"{where} has no image (got {type(value).__name__}); every item needs one.")
    return value if value.mode == "RGB" else value.convert("RGB")


def missing_text(value: Any) -> bool:
    """True for an empty cell: None, "", or the "nan" that pandas round trips leave in MMBench-style tables."""
    return value is None or (isinstance(value, float) and value != value) or str(value).strip() in ("", "nan")
