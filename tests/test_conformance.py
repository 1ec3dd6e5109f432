"""Every registered method, the built-ins and the example plugins alike, keeps the method contract."""
import pytest
from conftest import EXAMPLES, NCR_ABLATION_PLUGIN

from ncbench.registry import METHODS, load_plugin_file
from ncbench.testing import check_method

EXAMPLE_PLUGINS = (EXAMPLES / "ncbench-example-plugin" / "src" / "ncbench_example_plugin" / "sce.py", NCR_ABLATION_PLUGIN)


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
