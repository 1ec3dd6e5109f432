"""Image-caption pairs in WebDataset tar shards, as img2dataset writes them (datasets/README.md#webdataset).

``--data-root`` is a shard pattern (``DIR/{00000..00009}.tar``), one ``.tar``, a folder (its ``*.tar``), or
``train=PATTERN;dev=PATTERN;test=PATTERN``. A sample is the run of consecutive members sharing a key (the member
name up to the first dot of its base name): one image (jpg, jpeg, png or webp) and its caption, a ``txt`` member or a
``json`` member's ``caption`` field (``text`` as a fallback; a list gives several captions). One pattern is split by
a fixed-seed hash of the keys (:func:`ncbench.datasets.streamed.seeded_split`). Shards are read with the standard
library's tar reader, twice: captions first, then images, one block at a time into the image cache.
"""
from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path, PurePosixPath
from typing import Iterator

from ncbench.data import Dataset, Pairs, check_captions
from ncbench.datasets.streamed import SPLITS, Sample, build_splits, check_split_sizes, read_sidecar, seeded_split
from ncbench.errors import UserError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
JSON_CAPTION_FIELDS = ("caption", "text")  # looked up in this order unless ncbench.json names the field
SIDECAR_OPTIONS = {"caption_field": str, "clean": bool}
_RANGE = re.compile(r"\{(-?\d+)\.\.(-?\d+)\}")
_LIST = re.compile(r"\{([^{}]*,[^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """The shard paths of a WebDataset brace pattern: ``{000..009}`` (zero padding kept) and ``{a,b}``, in order."""
    found = [m for m in (_RANGE.search(pattern), _LIST.search(pattern)) if m is not None]
    if not found:
        return [pattern]
    match = min(found, key=lambda m: m.start())  # the leftmost group varies slowest, as in braceexpand
    if match.re is _RANGE:
        lo, hi = match.group(1), match.group(2)
        padded = any(len(x.lstrip("-")) > 1 and x.lstrip("-").startswith("0") for x in (lo, hi))
        width = max(len(lo), len(hi)) if padded else 0
        step = 1 if int(hi) >= int(lo) else -1
        parts = [str(n).zfill(width) for n in range(int(lo), int(hi) + step, step)]
    else:
        parts = match.group(1).split(",")
    head, tail = pattern[: match.start()], pattern[match.end():]
    return [path for part in parts for path in expand_braces(head + part + tail)]


def parse_root(spec: str) -> dict[str, list[Path]] | list[Path]:
    """``--data-root``: the shards of each split (``train=...;dev=...;test=...``), or of one pattern to split."""
    if "=" in spec.split("/")[0] or ";" in spec:
        named: dict[str, list[Path]] = {}
        for part in filter(None, (p.strip() for p in spec.split(";"))):
            split, sep, pattern = part.partition("=")
            if not sep or split.strip() not in SPLITS or split.strip() in named:
                raise UserError(f"--data-root {spec}: expected train=PATTERN;dev=PATTERN;test=PATTERN, each once "
                                f"(got {part!r})")
            named[split.strip()] = _shards(pattern.strip())
        if set(named) != set(SPLITS):
            raise UserError(f"--data-root {spec}: give all of train=, dev= and test= (or one pattern to split)")
        return named
    return _shards(spec)


def _shards(pattern: str) -> list[Path]:
    """The existing shard files of a pattern, a ``.tar`` file or a folder of them; one line naming the first missing."""
    path = Path(pattern).expanduser()
    if "{" not in pattern and path.is_dir():
        shards = sorted(p for p in path.iterdir() if p.name.endswith((".tar", ".tar.gz", ".tgz")))
        if not shards:
            raise UserError(f"--data-root {pattern}: a folder without .tar shards")
        return shards
    shards = [Path(p).expanduser() for p in expand_braces(pattern)]
    missing = [p for p in shards if not p.is_file()]
    if missing:
        raise UserError(f"--data-root {pattern}: {len(missing)} of {len(shards)} shards missing, e.g. {missing[0]}")
    return shards


def split_name(name: str) -> tuple[str, str]:
    """(key, extension) of a member name, as WebDataset groups them: the key ends at the first dot of the base name."""
    path = PurePosixPath(name)
    stem, _, ext = path.name.partition(".")
    return str(path.parent / stem) if str(path.parent) != "." else stem, ext.lower()


def _members(shard: Path, read: set[str] | None) -> Iterator[tuple[str, str, str, bytes | None]]:
    """(member name, key, extension, bytes) of each file member in order; bytes only for extensions in ``read``
    (None: images and captions both)."""
    try:
        size = None if shard.name.endswith(("gz", ".tgz")) else shard.stat().st_size  # offsets are in the plain tar
        end = 0
        with tarfile.open(shard, "r:*") as tar:
            for member in tar:
                end = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                if not member.isfile():
                    continue
                if size is not None and member.offset_data + member.size > size:
                    raise UserError(f"{shard}: member {member.name} ends past the end of the file; the shard is truncated")
                key, ext = split_name(member.name)
                data = None
                if read is None or ext in read:
                    handle = tar.extractfile(member)
                    data = handle.read() if handle is not None else b""
                yield member.name, key, ext, data
        if size is not None:
            _check_end(shard, end)
    except (tarfile.TarError, OSError, EOFError) as err:
        raise UserError(f"{shard}: not a readable tar shard ({type(err).__name__}: {err})") from None


def _check_end(shard: Path, end: int) -> None:
    """A complete tar ends, after its last member, in zero blocks; the tar reader stops quietly at a truncated one."""
    with open(shard, "rb") as f:
        f.seek(end)
        block = f.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE or any(block):
        raise UserError(f"{shard}: no end-of-archive after byte {end}; the shard is truncated or damaged")


class WebDataset(Dataset):
    """Image-caption pairs in WebDataset/img2dataset tar shards; unknown real noise, synthetic noise on top allowed."""

    name = "webdataset"
    description = "WebDataset tar shards (img2dataset): --data-root 'DIR/{00000..00009}.tar' or train=...;dev=...;test=..."
    layout = "WebDataset shards"

    @classmethod
    def check_run(cls, root: Path | None, noise: float) -> None:
        if root is None:
            raise UserError(f"--dataset {cls.name} needs --data-root: a shard pattern such as 'DIR/{{00000..00009}}.tar', "
                            f"a folder of .tar shards, or 'train=...;dev=...;test=...' (datasets/README.md#webdataset)")
        parse_root(str(root))

    def load(self, root: Path | None, cache_dir: Path, resolution: int = 224) -> Pairs:
        self.check_run(root, 0.0)
        spec = str(root)
        shards = parse_root(spec)
        first = (shards["train"] if isinstance(shards, dict) else shards)[0]
        options = read_sidecar(first.parent, SIDECAR_OPTIONS)
        fields = (options["caption_field"],) if "caption_field" in options else JSON_CAPTION_FIELDS
        if isinstance(shards, dict):
            samples = {split: [s for shard in shards[split] for s in _samples(shard, fields)] for split in SPLITS}
            _check_unique([s for split in SPLITS for s in samples[split]])
            mode = "given"
        else:
            every = [s for shard in shards for s in _samples(shard, fields)]
            _check_unique(every)
            chosen = seeded_split([s.key for s in every], f"--data-root {spec}")
            samples = {split: [s for s, c in zip(every, chosen) if c == split] for split in SPLITS}
            mode = "seeded"
        check_split_sizes({s: len(samples[s]) for s in SPLITS}, f"--data-root {spec}")
        by_split = shards if isinstance(shards, dict) else {"all": shards}
        all_shards = list(dict.fromkeys(p.resolve() for paths in by_split.values() for p in paths))
        stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in all_shards]
        splits = build_splits(samples, stats, resolution, cache_dir, self.name, lambda rows: _images(all_shards, rows))
        clean = options.get("clean", False)
        meta = {"layout": self.layout, "root": spec, "shards": len(all_shards), "split": mode,
                "images": {s: splits[s].n_images for s in SPLITS}, "captions": {s: splits[s].n_captions for s in SPLITS},
                "source_noise": "declared clean (ncbench.json)" if clean else "unknown"}
        return Pairs(self.name, **splits, test_protocols=("1k",), has_clean_mask=clean, meta=meta)


def _samples(shard: Path, fields: tuple[str, ...]) -> Iterator[Sample]:
    """The samples of one shard with their captions (image bytes are skipped here)."""
    key, image, captions, names = None, None, None, []

    def done() -> Sample:
        where = f"{shard}: sample {key!r} ({', '.join(names)})"
        if image is None:
            raise UserError(f"{where}: no image member (expected one of .{', .'.join(IMAGE_EXTENSIONS)})")
        if captions is None:
            raise UserError(f"{where}: no caption (expected a .txt member or a .json member with "
                            f"{' or '.join(repr(f) for f in fields)})")
        check_captions(captions, where)
        return Sample(key, tuple(c.strip() for c in captions), f"{shard}: member {image}")

    for name, k, ext, data in _members(shard, {"txt", "json"}):
        if k != key:
            if key is not None:
                yield done()
            key, image, captions, names = k, None, None, []
        names.append(name)
        if ext in IMAGE_EXTENSIONS:
            if image is not None:
                raise UserError(f"{shard}: sample {k!r} has two images, {image} and {name}; expected one")
            image = name
        elif ext == "txt":
            captions = [_text(data, shard, name)]
        elif ext == "json" and captions is None:
            captions = _json_captions(data, fields, shard, name)
    if key is None:
        raise UserError(f"{shard}: an empty shard (no members)")
    yield done()


def _text(data: bytes, shard: Path, name: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{shard}: member {name}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _json_captions(data: bytes, fields: tuple[str, ...], shard: Path, name: str) -> list[str] | None:
    """The captions in a sample's json member: the first of ``fields`` present, a string or a list of strings."""
    try:
        obj = json.loads(_text(data, shard, name))
    except json.JSONDecodeError as err:
        raise UserError(f"{shard}: member {name}: not JSON ({err})") from None
    if not isinstance(obj, dict):
        return None
    for field in fields:
        value = obj.get(field)
        if value is None:
            continue
        values = [value] if isinstance(value, str) else value
        if not (isinstance(values, list) and values and all(isinstance(v, str) for v in values)):
            raise UserError(f"{shard}: member {name}: field {field!r} must be a string or a list of strings")
        return values
    return None


def _check_unique(samples: list[Sample]) -> None:
    """Keys name images: the same key twice (in two shards, or split apart within one) is an error naming both."""
    seen: dict[str, str] = {}
    for s in samples:
        if s.key in seen:
            raise UserError(f"sample key {s.key!r} occurs twice: {seen[s.key]} and {s.where}; keys must be unique")
        seen[s.key] = s.where


def _images(shards: list[Path], rows: dict[str, dict[str, int]]) -> Iterator[tuple[str, int, bytes, str]]:
    """(split, row, image bytes, where) of each wanted sample, streaming the shards in order."""
    where_of = {key: (split, row) for split, keys in rows.items() for key, row in keys.items()}
    for shard in shards:
        for name, key, ext, data in _members(shard, set(IMAGE_EXTENSIONS)):
            if data is not None and key in where_of:
                split, row = where_of[key]
                yield split, row, data, f"{shard}: member {name}"
