"""Flickr30K and MS-COCO from Karpathy's split files ``dataset_flickr30k.json`` / ``dataset_coco.json``.

``<root>/dataset_*.json`` and ``<root>/images/``: an entry's image is ``images/<filepath>/<filename>``
(COCO entries carry ``filepath`` train2014/val2014), or ``images/<filename>`` when the entry has no
``filepath`` or the file is not in that subfolder. Splits: train + restval -> train, val -> dev,
test -> test (SCAN's splits: COCO 113,287 / 5,000 / 5,000 images). The first five ``raw`` sentences of
an image are its captions, as SCAN keeps five per image. The exact layout is in datasets/README.md.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np

from ncbench.data import Dataset, Pairs, Split, cached_images, check_captions, inside, read_json_object
from ncbench.datasets.scan import SPLITS, file_pairs
from ncbench.errors import UserError

SPLIT_OF = {"train": "train", "restval": "train", "val": "dev", "test": "test"}


class KarpathyJSON(Dataset):
    """Base of the Karpathy-split adapters: one JSON file of images with sentences and a split each."""

    layout = "Karpathy JSON"
    json_name: ClassVar[str]
    captions_per_image: ClassVar[int] = 5

    def load(self, root: Path | None, cache_dir: Path, resolution: int = 224) -> Pairs:
        self.check_run(root, 0.0)  # also when a caller skipped the harness's check
        root = Path(root).resolve()
        path = root / self.json_name
        files: dict[str, list[Path]] = {s: [] for s in SPLITS}
        captions: dict[str, list[str]] = {s: [] for s in SPLITS}
        caption_image: dict[str, list[int]] = {s: [] for s in SPLITS}
        for n, entry in enumerate(_images(path)):
            try:
                split, name = entry["split"], entry["filename"]
                sentences = [s["raw"].strip() for s in entry["sentences"]][: self.captions_per_image]
            except (KeyError, TypeError, AttributeError) as err:
                raise UserError(f"{path}: images[{n}] lacks a split, filename or sentences with 'raw' text ({err!r})") from None
            if split not in SPLIT_OF:
                raise UserError(f"{path}: images[{n}] has split {split!r}; expected one of {', '.join(SPLIT_OF)}")
            if not sentences:
                raise UserError(f"{path}: images[{n}] ({name}) has no sentences")
            check_captions(sentences, f"{path}: images[{n}] ({name})")
            split = SPLIT_OF[split]
            caption_image[split] += [len(files[split])] * len(sentences)
            captions[split] += sentences
            files[split].append(inside(root / "images", _image_file(root / "images", entry.get("filepath", ""), name),
                                       f"{path}: images[{n}]"))
        splits = {}
        for split in SPLITS:
            if not files[split]:
                raise UserError(f"{path}: no images in the {split} split")
            splits[split] = Split(cached_images(files[split], resolution, cache_dir, f"{self.name}-{split}"),
                                  tuple(captions[split]), np.asarray(caption_image[split], dtype=np.int64))
        return file_pairs(self, root, splits)


def _images(path: Path) -> list:
    expected = "a JSON object with an 'images' list (Karpathy's split format)"
    images = read_json_object(path, expected).get("images")
    if not isinstance(images, list):
        raise UserError(f"{path}: expected {expected}")
    return images


def _image_file(folder: Path, subfolder: str, name: str) -> Path:
    """``folder/subfolder/name``, or ``folder/name`` when there is no subfolder or the file is not in it."""
    if subfolder:
        nested = folder / subfolder / name
        if nested.exists() or not (folder / name).exists():
            return nested
    return folder / name


class KarpathyF30K(KarpathyJSON):
    """Flickr30K from ``dataset_flickr30k.json``; test protocol 1K."""

    name = "karpathy-f30k"
    description = "Flickr30K from Karpathy's dataset_flickr30k.json and an images/ folder"
    family = "f30k"
    json_name = "dataset_flickr30k.json"
    markers = (json_name,)


class KarpathyCOCO(KarpathyJSON):
    """MS-COCO from ``dataset_coco.json``; protocols COCO 1K (5 folds) and 5K on the 5,000 test images."""

    name = "karpathy-coco"
    description = "MS-COCO from Karpathy's dataset_coco.json and images/{train2014,val2014}/"
    family = "coco"
    json_name = "dataset_coco.json"
    markers = (json_name,)
