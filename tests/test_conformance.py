"""Every registered method, the built-ins and the example plugins alike, keeps the method contract."""
from pathlib import Path

import pytest

from ncbench.registry import METHODS, load_plugin_file
from ncbench.testing import check_method

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
EXAMPLE_PLUGINS = (EXAMPLES / "ncbench-example-plugin" / "src" / "ncbench_example_plugin" / "sce.py",
                   EXAMPLES / "ablations" / "ncr_labeled_only.py")


def _methods() -> list[str]:
    for plugin in EXAMPLE_PLUGINS:
        load_plugin_file(plugin)
    return sorted(METHODS.entries())


@pytest.mark.parametrize("name", _methods())
def test_method_conforms(name, tmp_path):
    check_method(METHODS.get(name), tmp_path)


def test_the_builtins_and_the_example_plugin_are_all_checked():
    assert {"clip", "gmm-filter", "gmm-weight", "ncr", "npc", "npc-official", "mscn", "decl", "bicro", "rcl", "osa",
            "sce", "ncr-labeled-only"} <= set(_methods())
