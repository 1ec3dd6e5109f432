"""Checkpoints hold plain data only: numpy state round-trips, a pickle payload runs nothing, a damaged file heals."""
import os
import pickle

import numpy as np
import pytest
import torch

from ncbench import checkpoint
from ncbench.errors import UserError


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_round_trip_keeps_numpy_and_rng_state(tmp_path):
    rng = np.random.default_rng(3)
    state = {"epoch": 2, "method": {"w": np.arange(5, dtype=np.float32), "keep": [np.array([True, False])],
                                    "n": np.int64(7)},
             "rng": rng.bit_generator.state, "t": torch.ones(3)}
    checkpoint.save(tmp_path / "c.pt", state)
    back = checkpoint.load(tmp_path / "c.pt")
    assert isinstance(back["method"]["w"], np.ndarray) and back["method"]["w"].dtype == np.float32
    np.testing.assert_array_equal(back["method"]["w"], np.arange(5))
    np.testing.assert_array_equal(back["method"]["keep"][0], [True, False])
    assert back["method"]["n"] == 7 and back["epoch"] == 2 and torch.equal(back["t"], torch.ones(3))
    restored = np.random.default_rng()
    restored.bit_generator.state = back["rng"]
    assert restored.random() == rng.random()
    assert os.listdir(tmp_path) == ["c.pt"]  # no temporary file left


def test_pickle_payload_runs_nothing_and_is_refused(tmp_path):
    marker = tmp_path / "executed"
    torch.save({"epoch": 1, "x": _Payload(marker)}, tmp_path / "c.pt")
    with pytest.raises(UserError, match="refusing to load"):
        checkpoint.load(tmp_path / "c.pt")
    assert not marker.exists() and (tmp_path / "c.pt").exists()


@pytest.mark.parametrize("content", [b"", b"garbage" * 50, "truncated"])
def test_damaged_checkpoint_is_moved_aside(tmp_path, content):
    path = tmp_path / "c.pt"
    if content == "truncated":
        checkpoint.save(path, {"x": torch.zeros(1000)})
        content = path.read_bytes()[:300]
    path.write_bytes(content)
    with pytest.warns(UserWarning, match="unreadable checkpoint"):
        assert checkpoint.load(path) is None
    assert not path.exists() and len(list(tmp_path.glob("c.pt.corrupt-*"))) == 1


def test_raw_pickle_payload_is_not_executed(tmp_path):
    marker = tmp_path / "executed"
    (tmp_path / "c.pt").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.warns(UserWarning):
        assert checkpoint.load(tmp_path / "c.pt") is None
    assert not marker.exists()
