"""Flickr30K, MS-COCO and CC120K in the SCAN-split layout that the NPC code reads (datasets/README.md#scan-split).

``<root>/annotations/scan_split/{train,dev,test}_{caps,ids}.txt`` and ``<root>/images/``; the image file
of an id is NPC's ``id2name``: ``image_name.txt[id]`` (F30K), ``COCO_2014_<id:012d>.jpg`` (COCO),
``<id>.jpg`` (CC120K). The exact layout is in datasets/README.md.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from ncbench.data import Dataset, Pairs, Split, cached_images, check_captions, index_images, inside, read_lines
from ncbench.errors import UserError

SPLITS = ("train", "dev", "test")
COCO_TEST_IMAGES = 5000  # coco-1k = 5 folds of 1,000 images of the 5K test split (docs/evaluation.md#coco-1k)


def coco_protocols(test: Split) -> tuple[tuple[str, ...], dict]:
    """COCO's protocols and why one is left out: coco-1k needs the 5,000-image test split; coco-5k is the whole split."""
    if test.n_images == COCO_TEST_IMAGES:
        return ("coco-1k", "coco-5k"), {}
    reason = f"the test split has {test.n_images} images; coco-1k needs exactly {COCO_TEST_IMAGES} (5 folds of 1,000)"
    return ("coco-5k",), {"skipped_protocols": {"coco-1k": reason}}


def file_pairs(adapter: Dataset, root: Path, splits: dict[str, Split]) -> Pairs:
    """The Pairs of a file-backed adapter: test protocols by family (COCO: 1K folds and 5K, else 1K), no clean
    mask for real-noise data, and the layout, root and split sizes as meta."""
    protocols, notes = coco_protocols(splits["test"]) if adapter.family == "coco" else (("1k",), {})
    meta = {"layout": adapter.layout, "root": str(root), "images": {s: splits[s].n_images for s in SPLITS},
            "captions": {s: splits[s].n_captions for s in SPLITS}, **notes}
    return Pairs(adapter.name, **splits, test_protocols=protocols, has_clean_mask=not adapter.real_noise, meta=meta)


class ScanSplit(Dataset):
    """Base of the SCAN-split adapters: captions and ids per split, one images folder (datasets/README.md#scan-split)."""

    layout = "SCAN-split (NPC)"
    markers = ("annotations/scan_split/train_caps.txt",)
    captions_per_image: ClassVar[int] = 5  # NPC's --num_anns

    def load(self, root: Path | None, cache_dir: Path, resolution: int = 224) -> Pairs:
        self.check_run(root, 0.0)  # also when a caller skipped the harness's check
        root = Path(root).resolve()
        ann = root / "annotations" / "scan_split"
        splits = {}
        for split in SPLITS:
            captions = read_lines(ann / f"{split}_caps.txt")
            if not captions:
                raise UserError(f"{ann / f'{split}_caps.txt'}: no captions")
            check_captions(captions, ann / f"{split}_caps.txt")
            ids = self._caption_ids(read_lines(ann / f"{split}_ids.txt"), len(captions), ann / f"{split}_ids.txt")
            image_ids, caption_image = index_images(ids)
            files = [inside(root / "images", root / "images" / name, ann / f"{split}_ids.txt")
                     for name in self.file_names(image_ids, ann, ann / f"{split}_ids.txt")]
            splits[split] = Split(cached_images(files, resolution, cache_dir, f"{self.name}-{split}"),
                                  tuple(captions), caption_image)
        return file_pairs(self, root, splits)

    def _caption_ids(self, ids: list[str], n_captions: int, ids_file: Path) -> list[str]:
        """One image id per caption: NPC's train ids list each image once (repeated ``num_anns`` times),
        its dev/test ids list one id per caption (datasets/README.md#scan-split); either form is read for any split."""
        k = self.captions_per_image
        if len(ids) == n_captions:
            return ids
        if len(ids) * k == n_captions:
            return [i for i in ids for _ in range(k)]
        raise UserError(f"{ids_file}: {len(ids)} ids for {n_captions} captions in {ids_file.name.replace('_ids', '_caps')}; "
                        f"expected one id per caption ({n_captions}) or one per image ({n_captions}/{k})")

    def file_names(self, image_ids: list[str], ann: Path, ids_file: Path) -> list[str]:
        """The file name under ``images/`` of each image id (NPC's ``id2name``)."""
        raise NotImplementedError


def _int_id(image_id: str, ids_file: Path, what: str) -> int:
    try:
        value = int(image_id)
    except ValueError:
        value = -1
    if value < 0:
        raise UserError(f"{ids_file}: image id {image_id!r} is not a non-negative integer ({what})")
    return value


class ScanF30K(ScanSplit):
    """Flickr30K, SCAN split (1,000 test images, 5 captions each), test protocol 1K (docs/evaluation.md#protocols)."""

    name = "f30k"
    description = "Flickr30K, SCAN-split layout of the NPC code (annotations/scan_split, image_name.txt, images/)"
    family = "f30k"

    def file_names(self, image_ids: list[str], ann: Path, ids_file: Path) -> list[str]:
        names = read_lines(ann / "image_name.txt")
        out = []
        for image_id in image_ids:
            k = _int_id(image_id, ids_file, "F30K ids index the lines of image_name.txt")
            if k >= len(names):
                raise UserError(f"{ids_file}: image id {k} is past the end of {ann / 'image_name.txt'} ({len(names)} names)")
            out.append(names[k])
        return out


class ScanCOCO(ScanSplit):
    """MS-COCO, SCAN split with the 5K test split: protocols COCO 1K (5 folds) and 5K (docs/evaluation.md#protocols)."""

    name = "coco"
    description = "MS-COCO, SCAN-split layout of the NPC code (images renamed COCO_2014_<12-digit id>.jpg)"
    family = "coco"

    def file_names(self, image_ids: list[str], ann: Path, ids_file: Path) -> list[str]:
        return [f"COCO_2014_{_int_id(i, ids_file, 'COCO image ids'):012d}.jpg" for i in image_ids]


class ScanCC120K(ScanSplit):
    """CC120K (NPC's Conceptual Captions subset): one caption per image, real unlabelled noise, 1K test."""

    name = "cc120k"
    description = "CC120K, SCAN-split layout of the NPC code (<id>.jpg); real noise: --noise 0 only"
    family = "cc"
    real_noise = True
    captions_per_image = 1

    def file_names(self, image_ids: list[str], ann: Path, ids_file: Path) -> list[str]:
        return [f"{i}.jpg" for i in image_ids]
