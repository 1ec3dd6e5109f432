"""The tiny model's shipped embedded weights: found by the digest of architecture and recipe, used without
pretraining, and (slow) what pretraining regenerates."""
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ncbench import pretrain
from ncbench.backbone import load_backbone
from ncbench.recipe import PretrainSpec, current_spec, weights_key

MODEL = "ncbench-tiny"
# Pretraining is not bitwise reproducible: a different thread count or CPU changes floating-point reduction orders,
# which six epochs amplify. Regenerated on the machine that made the shipped file with one torch thread: relative L2
# difference 0.030 over all weights (largest absolute difference 0.025); the test suite's smoke recipe (2,000
# images, 1 epoch, same initialisation) lands at 0.28.
RELATIVE_TOLERANCE = 0.1


def relative_difference(a: dict, b: dict) -> float:
    """||a - b|| / ||b|| over every tensor of two state dicts with the same keys and shapes."""
    num = sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in b)
    den = sum(float((b[k].double() ** 2).sum()) for k in b)
    return (num / den) ** 0.5


def test_default_recipe_ships_and_loads_without_pretraining(tmp_path):
    shipped = pretrain.shipped_weights(MODEL, PretrainSpec())
    assert shipped is not None, (f"no shipped weights for key {weights_key(MODEL, PretrainSpec())}: the architecture "
                                 "or recipe changed; run `ncbench pretrain` and ship the cached file as safetensors")
    assert shipped.name == f"{MODEL}-{weights_key(MODEL, PretrainSpec())}.safetensors"
    state = pretrain.pretrained_state(MODEL, tmp_path, PretrainSpec())
    assert not any(tmp_path.iterdir())  # nothing generated, nothing pretrained
    identical, _ = pretrain.compare_states(state, load_file(shipped))
    assert identical
    model = load_backbone(MODEL, "none", tmp_path).model
    model.load_state_dict(state)  # every key and shape of the architecture


def test_other_recipes_are_not_shipped():
    assert (os.environ["NCBENCH_PRETRAIN_IMAGES"], os.environ["NCBENCH_PRETRAIN_EPOCHS"]) == ("2000", "1")
    assert current_spec() != PretrainSpec()
    assert pretrain.shipped_weights(MODEL, current_spec()) is None  # the suite pretrains its tiny recipe


def test_compare_states():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.zeros(3)}
    assert pretrain.compare_states(a, {k: v.clone() for k, v in a.items()}) == (True, 0.0)
    assert pretrain.compare_states(a, {"w": torch.tensor([1.0, 2.5]), "b": torch.zeros(3)}) == (False, 0.5)
    assert pretrain.compare_states(a, {"w": a["w"]}) == (False, float("inf"))


@pytest.mark.slow
def test_regenerated_weights_match_the_shipped_file(tmp_path: Path):
    """Pretrains the default recipe from scratch (about 5 min of CPU on 2 cores)."""
    state = pretrain.pretrain(MODEL, tmp_path, PretrainSpec())
    shipped = load_file(pretrain.shipped_weights(MODEL, PretrainSpec()))
    identical, largest = pretrain.compare_states(state, shipped)
    assert identical or relative_difference(state, shipped) < RELATIVE_TOLERANCE, (largest,
                                                                                  relative_difference(state, shipped))
