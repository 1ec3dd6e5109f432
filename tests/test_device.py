"""Precision: what each ``--precision`` computes in, on the CPU (CUDA's bf16 is the same autocast on another device)."""
import pytest
import torch

from ncbench.device import autocast_for


@pytest.mark.parametrize("precision, dtype", [("auto", torch.float32), ("fp32", torch.float32),
                                              ("bf16", torch.bfloat16)])
def test_autocast_on_the_cpu(precision, dtype):
    layer = torch.nn.Linear(4, 3)
    with autocast_for(torch.device("cpu"), precision)():
        out = layer(torch.randn(2, 4))
    assert out.dtype == dtype and layer.weight.dtype == torch.float32  # master weights stay fp32
