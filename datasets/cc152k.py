"""CC152K as the NCR family ships it, with the raw images a CLIP benchmark needs (datasets/README.md#cc152k).

NCR's archive ``NCR-data.tar`` holds ``cc152k_precomp/{train,dev,test}_caps.tsv`` (``id<TAB>caption``) and
``{split}_ims.npy``: precomputed Faster R-CNN region features, which a CLIP model cannot use, and no images.
The raw-image variant comes from NCR's ``cc152k/{split}_caps_img_urls.csv`` (``id<TAB>caption<TAB>url``):
the user downloads each URL to ``<root>/images/<id>.jpg``. Captions and ids are read from the ``.tsv``
files when present, otherwise from the URL files; the ``_ims.npy`` features are never read. One caption
per image; the noise is real and unlabelled (about 3–20 %), so runs use ``--noise 0``; 1K test protocol.
"""
from __future__ import annotations

import csv
from pathlib import Path

from ncbench.data import Dataset, Pairs, Split, cached_images, index_images, inside
from ncbench.datasets.scan import SPLITS, file_pairs
from ncbench.errors import UserError


class CC152K(Dataset):
    """CC152K (NCR): 150,000 / 1,000 / 1,000 pairs of Conceptual Captions; real noise, no clean mask."""

    name = "cc152k"
    description = "CC152K of NCR: captions from cc152k_precomp/*.tsv or cc152k/*_caps_img_urls.csv, images/<id>.jpg"
    family = "cc"
    real_noise = True
    layout = "CC152K (NCR)"
    markers = ("cc152k_precomp/train_caps.tsv", "cc152k/train_caps_img_urls.csv")

    def load(self, root: Path | None, cache_dir: Path, resolution: int = 224) -> Pairs:
        self.check_run(root, 0.0)  # also when a caller skipped the harness's check
        root = Path(root).resolve()
        splits = {}
        for split in SPLITS:
            ids, captions = _rows(root, split)
            image_ids, caption_image = index_images(ids)
            files = [inside(root / "images", root / "images" / f"{i}.jpg", f"{root} {split} ids") for i in image_ids]
            splits[split] = Split(cached_images(files, resolution, cache_dir, f"{self.name}-{split}"),
                                  tuple(captions), caption_image)
        return file_pairs(self, root, splits)


def _rows(root: Path, split: str) -> tuple[list[str], list[str]]:
    """(ids, captions) of one split, read as NCR reads them (``csv.reader`` with tab delimiter, field 0 and 1)."""
    sources = (root / "cc152k_precomp" / f"{split}_caps.tsv", root / "cc152k" / f"{split}_caps_img_urls.csv")
    path = next((p for p in sources if p.is_file()), None)
    if path is None:
        raise UserError(f"missing file {sources[0]} (or {sources[1]}); layouts: datasets/README.md")
    ids, captions = [], []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for n, row in enumerate(csv.reader(f, delimiter="\t"), 1):
                if len(row) < 2 or not row[0].strip():
                    raise UserError(f"{path}: line {n} is not id<TAB>caption")
                if not row[1].strip():
                    raise UserError(f"{path}: line {n}: the caption is empty; every caption needs text")
                ids.append(row[0].strip())
                captions.append(row[1].strip())
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not ids:
        raise UserError(f"{path}: no captions")
    return ids, captions
