"""Presets: named run settings per (method, dataset family), as data.

``config.resolve`` applies a preset's values after the method's ``run_defaults`` and before explicit
flags, and the record keeps the resolved values plus the preset's name (the name is not part of the
run id: a preset is a way to reach values, not a value).

``paper`` is the recipe the NPC paper's code uses for every dataset and noise ratio (its README
commands; docs/methods/clip.md#official-recipe and docs/methods/npc.md#official-hyper-parameters):
OpenAI CLIP ViT-B/32 (QuickGELU), batch 256, 5 epochs, AdamW wd 0.2, 500 warm-up steps; lr 5e-7 for
plain CLIP, 2e-7 and gradient clipping at 10 for NPC. GMM filtering and NCR have no CLIP paper: they
run on the suite's base CLIP optimiser, i.e. the CLIP recipe; MSCN's CLIP adaptation keeps the
harness's optimiser, lr, schedule, batch, epochs and clipping (docs/methods/mscn.md#mscn-a13), i.e.
the same recipe (docs/methods/clip.md#paper-preset). Known differences from the official runs
(docs/methods/clip.md#adaptation, rows CLIP-A1 to CLIP-A3): the official optimiser stepped pure-fp16
weights (ncbench keeps fp32 master weights under bf16 autocast), its cosine advanced by rows rather
than batches, and it selected the epoch by dev mean R@1 (ncbench: dev rSum). The official lrs were
tuned for that fp16 optimiser.
"""
from __future__ import annotations

from ncbench.errors import UserError

FAMILIES = ("f30k", "coco", "cc")  # Flickr30K, MS-COCO, Conceptual Captions subsets (CC120K, CC152K)

_CLIP_PAPER = {"model": "ViT-B-32-quickgelu", "pretrained": "openai", "batch_size": 256, "epochs": 5,
               "lr": 5e-7, "weight_decay": 0.2, "warmup_steps": 500, "grad_clip": 0.0}  # docs/methods/clip.md#paper-preset
_NPC_PAPER = {**_CLIP_PAPER, "lr": 2e-7, "grad_clip": 10.0}  # docs/methods/npc.md#official-hyper-parameters: lr 2e-7 (both optimisers), clip 10 on A

PRESETS: dict[str, dict[tuple[str, str], dict]] = {
    "paper": {
        **{("clip", f): _CLIP_PAPER for f in FAMILIES},
        **{(m, f): _NPC_PAPER for m in ("npc", "npc-official") for f in FAMILIES},
        **{(m, f): _CLIP_PAPER for m in ("gmm-filter", "gmm-weight", "ncr", "mscn") for f in FAMILIES},
    },
}


def dataset_family(dataset: str) -> str:
    """The family a registered dataset declares ("" for none, e.g. the synthetic world)."""
    from ncbench.registry import DATASETS

    return DATASETS.get(dataset).family


def preset_values(preset: str, method: str, dataset: str) -> dict:
    """The run settings ``preset`` gives ``method`` on ``dataset``; a one-line error when it has none."""
    if preset not in PRESETS:
        raise UserError(f"--preset {preset!r}: unknown; available: {', '.join(PRESETS)}")
    family = dataset_family(dataset)
    table = PRESETS[preset]
    if (method, family) not in table:
        methods = sorted({m for m, _ in table})
        families = sorted({f for _, f in table})
        raise UserError(f"--preset {preset} has no settings for method {method!r} on dataset {dataset!r} "
                        f"(family {family or 'none'}); it covers methods {', '.join(methods)} "
                        f"on families {', '.join(families)}")
    return dict(table[(method, family)])
