"""What the streamed adapters (``webdataset``, ``hf``) share: the ``ncbench.json`` sidecar, the seeded split of data
that has none, and the image cache filled from encoded images read one block at a time (datasets/README.md).

Unlike :func:`ncbench.data.cached_images`, which decodes files, these caches are filled from bytes inside tar
shards or arrow/parquet columns. Each split's cache is the same file format and naming as the file adapters'
(``<cache>/images/<dataset>-<split>-<size>px-<key>.npy``, read back as a memory map).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from ncbench.data import IMAGE_CACHE_VERSION, Split, decode_bytes, read_json_object
from ncbench.errors import UserError
from ncbench.progress import progress_bar
from ncbench.seeding import stable_hash

SPLITS = ("train", "dev", "test")
SIDECAR = "ncbench.json"
HELD_OUT_SHARE = 0.05  # seeded split: dev and test each take this share of the images ...
HELD_OUT_MAX = 1000  # ... up to 1,000 each (the 1K protocol of CC152K / Flickr30K)
SPLIT_SEED = "ncbench-heldout-v1"  # fixed: the same data gives the same split in every run and seed
BLOCK = 256  # encoded images held in memory at a time while a cache is built


@dataclass(frozen=True)
class Sample:
    """One image and its captions, before decoding; ``where`` names it in messages (shard and member, or row)."""

    key: str
    captions: tuple[str, ...]
    where: str


def read_sidecar(folder: Path, allowed: dict[str, type]) -> dict:
    """The options in ``folder/ncbench.json`` (none: ``{}``), each checked against ``allowed`` (name -> type)."""
    path = Path(folder) / SIDECAR
    if not path.is_file():
        return {}
    options = read_json_object(path, f"a JSON object of options ({', '.join(allowed)})")
    for name, value in options.items():
        if name not in allowed:
            raise UserError(f"{path}: unknown option {name!r}; expected {', '.join(allowed)}")
        if not isinstance(value, allowed[name]):
            raise UserError(f"{path}: option {name!r} must be a {allowed[name].__name__}, got {value!r}")
    return options


def held_out_size(n_images: int) -> int:
    """Images in each of dev and test under the seeded split: 5 % of the images, at least 1, at most 1,000."""
    return max(1, min(HELD_OUT_MAX, round(HELD_OUT_SHARE * n_images)))


def seeded_split(keys: Sequence[str], source: str) -> list[str]:
    """The split of each image key when the data has none: keys ordered by a fixed-seed hash, the first
    :func:`held_out_size` go to test, the next as many to dev, the rest to train. Depends on the keys alone, not
    on their order, the shard count or the run seed."""
    if len(keys) < 3:
        raise UserError(f"{source}: {len(keys)} images; a seeded train/dev/test split needs at least 3")
    k = held_out_size(len(keys))
    order = sorted(range(len(keys)), key=lambda i: stable_hash(SPLIT_SEED, keys[i], length=16))
    split = ["train"] * len(keys)
    for rank, i in enumerate(order[: 2 * k]):
        split[i] = "test" if rank < k else "dev"
    return split


def check_split_sizes(counts: dict[str, int], source: str) -> None:
    """Every split holds an image: one line naming ``source`` and the empty split otherwise."""
    for split in SPLITS:
        if not counts.get(split):
            raise UserError(f"{source}: no images in the {split} split")


def build_splits(samples: dict[str, list[Sample]], stats: object, size: int, cache_dir: Path, label: str,
                 images: Callable[[dict[str, dict[str, int]]], Iterable[tuple[str, int, bytes, str]]]) -> dict[str, Split]:
    """Each split's :class:`Split`, its images decoded once into the image cache.

    ``stats`` identifies the data's bytes (paths, sizes, modification times), hashed with the split's keys into
    the cache name. ``images(rows)``, called only when a cache is missing, yields ``(split, row, encoded bytes,
    where)`` for every sample of ``rows`` (split -> key -> row), in the order the data is stored, one at a time.
    """
    targets, rows = {}, {}
    for split in SPLITS:
        keys = [s.key for s in samples[split]]
        rows[split] = {k: i for i, k in enumerate(keys)}
        digest = stable_hash(IMAGE_CACHE_VERSION, size, stats, split, keys, length=16)
        targets[split] = Path(cache_dir) / "images" / f"{label}-{split}-{size}px-{digest}.npy"
    missing = [s for s in SPLITS if not targets[s].is_file()]
    if missing:
        _fill(targets, {s: rows[s] for s in missing}, size, label, images)
    out = {}
    for split in SPLITS:
        captions = [c for s in samples[split] for c in s.captions]
        caption_image = np.repeat(np.arange(len(samples[split]), dtype=np.int64),
                                  [len(s.captions) for s in samples[split]])
        out[split] = Split(np.load(targets[split], mmap_mode="r"), tuple(captions), caption_image)
    return out


def _fill(targets: dict[str, Path], rows: dict[str, dict[str, int]], size: int, label: str,
          images: Callable[[dict[str, dict[str, int]]], Iterable[tuple[str, int, bytes, str]]]) -> None:
    """Write the caches of the splits in ``rows`` in one pass over the data, each atomically."""
    total = sum(len(r) for r in rows.values())
    with ExitStack() as stack:
        arrays, tmps = {}, {}
        for split, split_rows in rows.items():
            targets[split].parent.mkdir(parents=True, exist_ok=True)
            tmps[split] = tmp = targets[split].with_name(f".{targets[split].stem}.{os.getpid()}.tmp.npy")
            stack.callback(tmp.unlink, missing_ok=True)
            arrays[split] = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(split_rows), size, size, 3))
        written = {split: np.zeros(len(r), dtype=bool) for split, r in rows.items()}
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)))
        advance = stack.enter_context(progress_bar(f"decoding {label} at {size}px (once, cached)", total))
        block: list[tuple[str, int, bytes, str]] = []

        def flush() -> None:
            for (split, row, _, _), image in zip(block, pool.map(lambda item: decode_bytes(item[2], size, item[3]), block)):
                arrays[split][row] = image
                written[split][row] = True
                advance()
            block.clear()

        for item in images(rows):
            block.append(item)
            if len(block) == BLOCK:  # bounded memory: one block of encoded images at a time
                flush()
        flush()
        for split, done in written.items():
            if not done.all():
                raise UserError(f"{label} {split}: {int((~done).sum())} images vanished while the cache was built; "
                                f"was the data changed meanwhile?")
            arrays[split].flush()
            del arrays[split]
            os.replace(tmps[split], targets[split])  # complete: readers see no partial cache
