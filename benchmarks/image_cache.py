"""Images/s of a training epoch's pixels from the decoded-image cache vs from JPEG decoding (ncbench.data).

Generates ``--images`` JPEGs of 500x375 (the usual Flickr30K/MS-COCO size; smooth gradients plus noise, quality
90) in a temporary folder, builds the cache once (timed separately: a one-off cost per dataset, split and
resolution), then walks one epoch of random batches twice, interleaved batch by batch so load changes on a
shared machine hit both alike: (a) decode each batch's JPEGs through open_clip's val geometry (resize the
shortest side, center crop), one thread, as a data-loader worker would; (b) gather the same rows from the
cache's memory map (page cache warm, as after the build). The last line is the ratio.

    python benchmarks/image_cache.py [--images 300] [--size 224] [--batch 64]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ncbench.data import cached_images, decode_image


def write_jpegs(folder: Path, n: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:375, 0:500].astype(np.float32)
    files = []
    for k in range(n):
        a, b, c = rng.uniform(0.2, 1.0, 3)
        base = np.stack([128 + 100 * np.sin(a * x / 40 + k), 128 + 100 * np.cos(b * y / 30), 255 * c * x / 500], -1)
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        files.append(folder / f"{k:06d}.jpg")
        Image.fromarray(pixels).save(files[-1], quality=90)
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = write_jpegs(Path(tmp), args.images)
        decode_image(files[0], args.size)  # imports open_clip's transforms outside the timings
        clock = time.perf_counter()
        cache = cached_images(files, args.size, Path(tmp) / "cache", "bench-train")
        build_s = time.perf_counter() - clock
        order = np.random.default_rng(1).permutation(len(files))
        decode_s = cache_s = 0.0
        for lo in range(0, len(order), args.batch):
            batch = order[lo:lo + args.batch]
            clock = time.perf_counter()
            decoded = np.stack([decode_image(files[i], args.size) for i in batch])
            decode_s += time.perf_counter() - clock
            clock = time.perf_counter()
            rows = np.sort(batch)
            gathered = cache[rows]
            cache_s += time.perf_counter() - clock
            assert np.array_equal(gathered[np.searchsorted(rows, batch)], decoded)
    n = len(files)
    print(f"{n} JPEGs 500x375 -> {args.size}px, batches of {args.batch}")
    print(f"cache build (once, threaded): {build_s:.2f} s ({n / build_s:.0f} images/s)")
    print(f"JPEG decode + resize + crop:  {n / decode_s:10.0f} images/s (one thread)")
    print(f"decoded-image cache (memmap): {n / cache_s:10.0f} images/s")
    print(f"ratio cache / decode: {decode_s / cache_s:.0f}x")


if __name__ == "__main__":
    main()
