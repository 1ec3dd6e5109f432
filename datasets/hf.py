"""Image-caption pairs in a Hugging Face ``datasets`` folder (``save_to_disk``) or parquet files (datasets/README.md#hf).

Read with pyarrow alone (memory-mapped arrow, parquet one row group at a time): no ``datasets`` import, no network,
no hub cache. Columns are detected (image: ``image``, ``img``, ...; captions: ``caption``, ``captions``,
``sentences``, ...) or named in ``<data-root>/ncbench.json``. A row's split is its ``split`` column (Karpathy names:
train and restval -> train, val -> dev, test -> test), else the split it is saved under (``DatasetDict`` split,
parquet file or folder name), else the fixed-seed split of :func:`ncbench.datasets.streamed.seeded_split`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ncbench.data import Dataset, Pairs, check_captions, read_json_object
from ncbench.datasets.streamed import SPLITS, Sample, build_splits, check_split_sizes, read_sidecar, seeded_split
from ncbench.errors import UserError

SPLIT_OF = {"train": "train", "restval": "train", "val": "dev", "validation": "dev", "dev": "dev", "test": "test"}
IMAGE_COLUMNS = ("image", "img", "jpg", "png", "webp", "image_bytes")
CAPTION_COLUMNS = ("caption", "captions", "sentences", "text", "raw")
SIDECAR_OPTIONS = {"image": str, "caption": str, "split": str, "clean": bool}
_LAYOUTS = "datasets/README.md#hf"
_FILE_SPLIT = re.compile(r"^(train|restval|val|validation|dev|test)(?:[-_.]|$)")


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401 - loads the submodule
    except ImportError:
        raise UserError("--dataset hf needs pyarrow: pip install 'ncbench[hf]'") from None
    return pyarrow


@dataclass(frozen=True)
class Table:
    """One arrow or parquet file and the split it is saved under (None: not known from where it lies)."""

    path: Path
    split: str | None

    def batches(self, columns: list[str]) -> Iterator:
        """Record batches of ``columns``: arrow files memory-mapped, parquet one row group's batch at a time."""
        pa = _pyarrow()
        try:
            if self.path.suffix == ".parquet":
                yield from pa.parquet.ParquetFile(self.path).iter_batches(batch_size=1024, columns=columns)
            else:
                for batch in _arrow_reader(pa, self.path):
                    yield batch.select(columns)
        except (pa.ArrowException, OSError) as err:
            raise UserError(f"{self.path}: cannot read it as {self.path.suffix[1:]} ({type(err).__name__}: "
                            f"{' '.join(str(err).split())[:200]})") from None

    def column_names(self) -> list[str]:
        pa = _pyarrow()
        try:
            if self.path.suffix == ".parquet":
                return list(pa.parquet.read_schema(self.path).names)
            return list(_arrow_reader(pa, self.path).schema.names)
        except (pa.ArrowException, OSError) as err:
            raise UserError(f"{self.path}: cannot read it as {self.path.suffix[1:]} ({type(err).__name__}: "
                            f"{' '.join(str(err).split())[:200]})") from None


def _arrow_reader(pa, path: Path):
    """``save_to_disk`` writes the arrow IPC stream format; the file format is read too."""
    source = pa.memory_map(str(path))
    try:
        return pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        return pa.ipc.open_file(source)


def find_tables(root: Path) -> list[Table]:
    """The data files of ``root``: a ``DatasetDict`` or ``Dataset`` saved with ``save_to_disk``, or parquet files."""
    if (root / "dataset_dict.json").is_file():
        splits = read_json_object(root / "dataset_dict.json", layouts=_LAYOUTS).get("splits")
        if not (isinstance(splits, list) and splits):
            raise UserError(f"{root / 'dataset_dict.json'}: expected {{\"splits\": [names]}} as save_to_disk writes it")
        return [t for name in splits for t in _saved(root / str(name), str(name))]
    if (root / "state.json").is_file():
        return _saved(root, None)
    files = sorted(root.rglob("*.parquet"))
    if not files:
        raise UserError(f"--data-root {root}: no Hugging Face dataset here (expected dataset_dict.json or state.json "
                        f"from save_to_disk, or .parquet files)")
    return [Table(f, _split_of_path(f.relative_to(root))) for f in files]


def _saved(folder: Path, split: str | None) -> list[Table]:
    files = read_json_object(folder / "state.json", layouts=_LAYOUTS).get("_data_files")
    if not (isinstance(files, list) and files and all(isinstance(f, dict) and "filename" in f for f in files)):
        raise UserError(f"{folder / 'state.json'}: expected '_data_files' with file names, as save_to_disk writes it")
    tables = [Table(folder / f["filename"], split) for f in files]
    missing = [t.path for t in tables if not t.path.is_file()]
    if missing:
        raise UserError(f"{folder / 'state.json'}: names {missing[0]}, which is missing")
    return tables


def _split_of_path(relative: Path) -> str | None:
    """The split a parquet file's name or folder names, as the hub lays them out (``data/train-00000-of-00002``)."""
    for part in reversed(relative.parts):
        match = _FILE_SPLIT.match(part)
        if match:
            return match.group(1)
    return None


class HFDataset(Dataset):
    """A Hugging Face dataset on disk (save_to_disk folder or parquet files) with image and caption columns."""

    name = "hf"
    description = "Hugging Face datasets folder (save_to_disk) or parquet files with image and caption(s) columns"
    layout = "Hugging Face datasets"

    def load(self, root: Path | None, cache_dir: Path, resolution: int = 224) -> Pairs:
        self.check_run(root, 0.0)
        root = Path(root).resolve()
        options = read_sidecar(root, SIDECAR_OPTIONS)
        tables = find_tables(root)
        names = tables[0].column_names()
        image = _column(options, "image", IMAGE_COLUMNS, names, tables[0].path)
        caption = _column(options, "caption", CAPTION_COLUMNS, names, tables[0].path)
        split_column = options.get("split", "split" if "split" in names else None)
        if split_column is not None and split_column not in names:
            raise UserError(f"{root / 'ncbench.json'}: split column {split_column!r} is not in {tables[0].path} "
                            f"(columns: {', '.join(names)})")
        every, given = [], []
        for table in tables:
            for sample, split in _rows(table, root, caption, split_column):
                every.append(sample)
                given.append(split)
        if not every:
            raise UserError(f"--data-root {root}: no rows")
        if any(s is None for s in given):
            if any(s is not None for s in given):
                raise UserError(f"--data-root {root}: some rows have a split and others none; give every row one")
            given, mode = seeded_split([s.key for s in every], f"--data-root {root}"), "seeded"
        else:
            mode = "split column" if split_column else "saved splits"
        samples = {split: [s for s, g in zip(every, given) if g == split] for split in SPLITS}
        check_split_sizes({s: len(samples[s]) for s in SPLITS}, f"--data-root {root}")
        stats = [(str(t.path), t.path.stat().st_size, t.path.stat().st_mtime_ns) for t in tables]
        splits = build_splits(samples, stats, resolution, cache_dir, self.name,
                              lambda rows: _images(tables, image, root, rows))
        clean = options.get("clean", False)
        meta = {"layout": self.layout, "root": str(root), "columns": {"image": image, "caption": caption,
                                                                    "split": split_column}, "split": mode,
                "images": {s: splits[s].n_images for s in SPLITS}, "captions": {s: splits[s].n_captions for s in SPLITS},
                "source_noise": "declared clean (ncbench.json)" if clean else "unknown"}
        return Pairs(self.name, **splits, test_protocols=("1k",), has_clean_mask=clean, meta=meta)


def _column(options: dict, role: str, candidates: tuple[str, ...], names: list[str], path: Path) -> str:
    """The column holding ``role``: named in ncbench.json, else the first candidate present."""
    if role in options:
        if options[role] not in names:
            raise UserError(f"ncbench.json: {role} column {options[role]!r} is not in {path} (columns: {', '.join(names)})")
        return options[role]
    found = next((c for c in candidates if c in names), None)
    if found is None:
        raise UserError(f"{path}: no {role} column (looked for {', '.join(candidates)}; columns: {', '.join(names)}); "
                        f"name it in ncbench.json as {{\"{role}\": \"COLUMN\"}}")
    return found


def _rows(table: Table, root: Path, caption: str, split_column: str | None) -> Iterator[tuple[Sample, str | None]]:
    """Each row's sample (captions; key = file under the root and row) and its ncbench split, or None when unknown."""
    columns = [caption] + ([split_column] if split_column else [])
    row = 0
    for batch in table.batches(columns):
        captions = batch.column(caption).to_pylist()
        splits = batch.column(split_column).to_pylist() if split_column else [table.split] * len(captions)
        for value, split in zip(captions, splits):
            where = f"{table.path}: row {row}"
            texts = _captions(value, caption, where)
            check_captions(texts, where)
            if split is not None and str(split) not in SPLIT_OF:
                raise UserError(f"{where}: split {split!r}; expected one of {', '.join(SPLIT_OF)}")
            yield Sample(_key(table, root, row), tuple(t.strip() for t in texts), where), \
                None if split is None else SPLIT_OF[str(split)]
            row += 1


def _key(table: Table, root: Path, row: int) -> str:
    return f"{table.path.relative_to(root).as_posix()}:{row}"


def _captions(value: object, column: str, where: str) -> list[str]:
    """A caption cell as texts: a string, a list of strings, or Karpathy's list of ``{"raw": text}``."""
    values = [value] if isinstance(value, str) else value
    if isinstance(values, list) and values:
        values = [v.get("raw") if isinstance(v, dict) else v for v in values]
        if all(isinstance(v, str) for v in values):
            return values
    raise UserError(f"{where}: column {column!r} holds {type(value).__name__} {str(value)[:60]!r}; expected a caption, "
                    f"a list of captions or of {{'raw': caption}}")


def _images(tables: list[Table], column: str, root: Path,
            rows: dict[str, dict[str, int]]) -> Iterator[tuple[str, int, bytes, str]]:
    """(split, row, image bytes, where) of each wanted row, one record batch at a time."""
    where_of = {key: (split, row) for split, keys in rows.items() for key, row in keys.items()}
    for table in tables:
        row = 0
        for batch in table.batches([column]):
            for cell in batch.column(column).to_pylist():
                target = where_of.get(_key(table, root, row))
                if target is not None:
                    where = f"{table.path}: row {row}"
                    yield (*target, _image_bytes(cell, root, where), where)
                row += 1


def _image_bytes(cell: object, root: Path, where: str) -> bytes:
    """The encoded image of a cell: raw bytes, or the ``Image`` feature's ``{"bytes", "path"}`` (a path is read
    as given, or under the data root)."""
    if isinstance(cell, (bytes, bytearray)):
        return bytes(cell)
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return cell["bytes"]
        if cell.get("path"):
            path = Path(cell["path"])
            for candidate in (path, root / path):
                if candidate.is_file():
                    return candidate.read_bytes()
            raise UserError(f"{where}: image file {path} not found (as given or under {root})")
    raise UserError(f"{where}: no image (expected encoded bytes or the Image feature's bytes/path, "
                    f"got {type(cell).__name__})")
