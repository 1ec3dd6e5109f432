"""Every registered method, the built-ins and the example plugin alike, keeps the method contract."""
from pathlib import Path

import pytest

from ncbench.registry import METHODS, load_plugin_file
from ncbench.testing import check_method

EXAMPLE_PLUGIN = (Path(__file__).resolve().parents[1] / "examples" / "ncbench-example-plugin" / "src"
                  / "ncbench_example_plugin" / "sce.py")


def _methods() -> list[str]:
    load_plugin_file(EXAMPLE_PLUGIN)
    return sorted(METHODS.entries())


@pytest.mark.parametrize("name", _methods())
def test_method_conforms(name, tmp_path):
    check_method(METHODS.get(name), tmp_path)


def test_the_builtins_and_the_example_plugin_are_all_checked():
    assert {"clip", "gmm-filter", "gmm-weight", "ncr", "npc", "npc-official", "mscn", "decl", "bicro", "rcl", "osa",
            "sce"} <= set(_methods())
