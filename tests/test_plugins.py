"""Plugins through the real ``ncbench`` command line: the example package installed with pip, the same code as
``module:Class`` and as a ``--plugin`` file, and one warning or error line for each way a plugin can be broken.

What registers code for the rest of a process (an installed package, a ``--plugin`` file, a ``module:Class``
that shares a name with the example's file registered by the conformance tests) runs in a new ``ncbench``
process; what only reads entry points off ``PYTHONPATH`` runs in this one."""
import fcntl
import json
import re
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from conftest import invoke, ncbench

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "ncbench-example-plugin"
SCE_FILE = EXAMPLE / "src" / "ncbench_example_plugin" / "sce.py"
MINI = ("--dataset", "synthetic-mini", "--epochs", "1")
WIDE = {"COLUMNS": "300"}  # one table row per line
RUN_TIMEOUT = 900  # a 1-epoch run takes ~40 s alone, minutes on a machine shared with other runs


def _pip(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", "-q", *args, "--disable-pip-version-check"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def _row(stdout: str, name: str) -> str:
    """The table row of ``name``."""
    rows = [line for line in stdout.splitlines() if re.match(rf"\W*{re.escape(name)}\s", line)]
    assert len(rows) == 1, stdout
    return rows[0]


def _lines(stderr: str, prefix: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith(prefix)]


def _one_error(proc: subprocess.CompletedProcess) -> str:
    """The single ``error:`` line of a command that failed on bad input."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (line,) = _lines(proc.stderr, "error:")
    return line


def _record(out: Path) -> dict:
    (path,) = out.glob("*/result.json")
    return json.loads(path.read_text())


def _write(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(textwrap.dedent(text))


# ---------------------------------------------------------------- the example plugin


@pytest.fixture
def installed_example(tmp_path):
    """The example package pip-installed (from a copy: a build writes beside its sources) into this environment,
    uninstalled afterwards; a lock keeps two test sessions from installing it at the same time."""
    source = tmp_path / "ncbench-example-plugin"
    _write(source, {str(p.relative_to(EXAMPLE)): p.read_text() for p in EXAMPLE.rglob("*")
                    if p.is_file() and p.suffix in (".py", ".toml")})
    with open(Path(tempfile.gettempdir()) / "ncbench-test-plugin-install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _pip("install", "--no-deps", "--no-build-isolation", str(source))
        try:
            yield
        finally:
            _pip("uninstall", "-y", "ncbench-example-plugin")


def test_installed_example_is_listed(installed_example):
    listing = ncbench("list", "methods", env=WIDE)
    assert listing.returncode == 0 and not _lines(listing.stderr, "warning:"), listing.stderr
    row = _row(listing.stdout, "sce")
    assert "ncbench-example-plugin 0.1.0" in row and "Wang et al., ICCV 2019" in row
    assert "built-in" in _row(listing.stdout, "clip")


@pytest.mark.slow
def test_installed_example_runs(installed_example, tmp_path):
    proc = ncbench("run", "--method", "sce", "--param", "beta=0.5", *MINI, "--out", tmp_path / "runs",
                   timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    record = _record(tmp_path / "runs")
    assert record["status"] == "complete" and record["method"]["name"] == "sce"
    assert record["config"]["params"] == {"alpha": 1.0, "beta": 0.5, "log_zero": -4.0}
    losses = record["epochs"][0]["losses"]  # the weighted terms (alpha 1, beta 0.5) and their sum
    assert losses["loss"] == pytest.approx(losses["ce"] + losses["rce"], rel=1e-4)
    assert 0 < losses["rce"] <= 0.5 * 4  # beta * |log_zero| bounds the reverse cross entropy


def test_example_is_found_as_module_class_without_installing():
    """Its hyper-parameters resolve (a bad ``--param`` stops the run before training, naming the method and its real
    parameters); the ``--plugin`` file form is listed in ``test_broken_plugin_files_do_not_hide_the_others``."""
    proc = ncbench("run", "--method", "ncbench_example_plugin.sce:SymmetricCE", "--param", "gamma=1", *MINI,
                   env={"PYTHONPATH": str(EXAMPLE / "src")})
    assert "--param gamma: unknown hyper-parameter of sce; available: alpha, beta, log_zero" in _one_error(proc)


@pytest.mark.slow
def test_module_class_and_plugin_file_run_the_same_method(tmp_path):
    by_module = ncbench("run", "--method", "ncbench_example_plugin.sce:SymmetricCE", *MINI, "--out", tmp_path / "a",
                        env={"PYTHONPATH": str(EXAMPLE / "src")}, timeout=RUN_TIMEOUT)
    by_file = ncbench("run", "--plugin", SCE_FILE, "--method", "sce", *MINI, "--out", tmp_path / "b",
                      timeout=RUN_TIMEOUT)
    assert by_module.returncode == 0, by_module.stderr
    assert by_file.returncode == 0, by_file.stderr
    a, b = _record(tmp_path / "a"), _record(tmp_path / "b")
    assert a["method"]["name"] == "sce" and a["run_id"] == b["run_id"]
    assert a["test"] == b["test"] and a["epochs"][0]["losses"] == b["epochs"][0]["losses"]


def test_docs_show_the_example_method_in_at_most_40_lines():
    code = SCE_FILE.read_text()
    assert len(code.splitlines()) <= 40
    assert f"```python\n{code}```" in (ROOT / "docs" / "writing-a-method.md").read_text()


# ---------------------------------------------------------------- broken --plugin files and module:Class

HEADER = """
from dataclasses import dataclass, field

from ncbench.data import Dataset
from ncbench.method import Method
from ncbench.methods.clip import CLIPFineTune
"""
PLUGIN_FILES = {
    "ncb_import_error.py": "import ncbench_no_such_module\n",
    "ncb_not_a_subclass.py": HEADER + """
class NotAMethod:
    name = "not-a-method"

    def training_step(self, batch):
        return {}
""",
    "ncb_no_step.py": HEADER + """
class NoStep(Method):
    name = "no-step"
""",
    "ncb_loose_params.py": HEADER + """
@dataclass
class LooseParams:
    rate: float = 0.1


class Loose(CLIPFineTune):
    name = "loose-params"
    Params = LooseParams
""",
    "ncb_bad_default.py": HEADER + """
@dataclass(frozen=True)
class TupleParams:
    rate: float = 0.1
    sizes: tuple = (1, 2)


class BadDefault(CLIPFineTune):
    name = "bad-default"
    Params = TupleParams
""",
    "ncb_no_default.py": HEADER + """
@dataclass(frozen=True)
class RequiredParams:
    rate: float


class NoDefault(CLIPFineTune):
    name = "no-default"
    Params = RequiredParams
""",
    "ncb_dataset_no_load.py": HEADER + """
class NoLoad(Dataset):
    name = "no-load"
""",
    "ncb_shadows_clip.py": HEADER + """
@dataclass(frozen=True)
class FakeParams:
    fake: int = 1


class FakeClip(CLIPFineTune):
    name = "clip"
    Params = FakeParams
""",
}
# file -> what its one line says (after the file's path)
FILE_PROBLEMS = {
    "ncb_import_error.py": ": failed to import: ModuleNotFoundError: No module named 'ncbench_no_such_module'",
    "ncb_not_a_subclass.py": ": defines no Method or Dataset subclass with a name",
    "ncb_no_step.py": ":NoStep): NoStep does not override the required hook training_step()",
    "ncb_loose_params.py": ":Loose): Loose.Params must be a frozen dataclass",
    "ncb_bad_default.py": ":BadDefault): hyper-parameter sizes=(1, 2) is a tuple; expected bool, int, float, str",
    "ncb_no_default.py": ":NoDefault): NoDefault.Params needs a default for every hyper-parameter",
    "ncb_dataset_no_load.py": ":NoLoad): NoLoad does not override the required hook load()",
    "ncb_shadows_clip.py": ":FakeClip) is ignored: method 'clip' (built-in, ncbench.methods.clip:CLIPFineTune) wins",
}


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plugins")
    _write(folder, PLUGIN_FILES)
    return folder


@pytest.fixture(scope="module")
def broken_files_listing(plugin_dir):
    """One ``ncbench list`` of every kind with all broken files and the working example as ``--plugin``s."""
    plugins = [arg for name in PLUGIN_FILES for arg in ("--plugin", plugin_dir / name)]
    return ncbench("list", *plugins, "--plugin", SCE_FILE, env=WIDE)


@pytest.mark.parametrize("name", FILE_PROBLEMS)
def test_broken_plugin_file_is_one_warning_line_in_list(broken_files_listing, plugin_dir, name):
    proc = broken_files_listing
    assert proc.returncode == 0, proc.stderr
    path = str(plugin_dir / name)
    (line,) = [line for line in _lines(proc.stderr, "warning:") if path in line]
    assert line.partition(path)[2].startswith(FILE_PROBLEMS[name]), line


def test_broken_plugin_files_do_not_hide_the_others(broken_files_listing):
    proc = broken_files_listing
    assert len(_lines(proc.stderr, "warning:")) == len(FILE_PROBLEMS)
    assert "built-in" in _row(proc.stdout, "clip") and f"file {SCE_FILE}" in _row(proc.stdout, "sce")
    assert "built-in" in _row(proc.stdout, "synthetic-mini")


@pytest.mark.parametrize("name, method", [("ncb_import_error.py", "x"), ("ncb_no_step.py", "no-step")])
def test_running_a_broken_plugin_file_is_one_error_line(plugin_dir, tmp_path, name, method):
    path = str(plugin_dir / name)
    line = _one_error(ncbench("run", "--plugin", path, "--method", method, *MINI, "--out", tmp_path))
    assert path in line and line.partition(path)[2].startswith(FILE_PROBLEMS[name]), line
    assert not any(tmp_path.iterdir())


def test_a_plugin_file_never_replaces_a_builtin(plugin_dir):
    """The built-in ``clip`` wins: its hyper-parameters (none), not the plugin's (``fake``), are the ones known."""
    proc = ncbench("run", "--plugin", plugin_dir / "ncb_shadows_clip.py", "--method", "clip", "--param", "fake=2", *MINI)
    assert "unknown hyper-parameter of clip; available: none" in _one_error(proc)
    (warning,) = _lines(proc.stderr, "warning:")
    assert "ncb_shadows_clip.py:FakeClip) is ignored" in warning


@pytest.mark.parametrize("target, problem", [
    ("ncb_not_a_subclass:NotAMethod", "method ncb_not_a_subclass:NotAMethod: is not a subclass of ncbench.method.Method"),
    ("ncb_shadows_clip:FakeClip", "method ncb_shadows_clip:FakeClip: its name 'clip' is taken by the built-in method"),
])
def test_broken_module_class_is_one_error_line(cli, plugin_dir, target, problem):
    proc = cli("run", "--method", target, *MINI, env={"PYTHONPATH": str(plugin_dir)})
    assert problem in _one_error(proc)


# ---------------------------------------------------------------- broken installed distributions

BROKEN_DIST = {
    "pyproject.toml": """
        [build-system]
        requires = ["setuptools>=64"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "ncbench-broken-plugin"
        version = "0.1"

        [project.entry-points."ncbench.methods"]
        ep-import-error = "ncbench_broken_plugin.missing:Anything"
        ep-not-a-method = "ncbench_broken_plugin.methods:NotAMethod"
        ep-no-step = "ncbench_broken_plugin.methods:NoStep"
        ep-loose-params = "ncbench_broken_plugin.methods:Loose"
        ep-bad-default = "ncbench_broken_plugin.methods:BadDefault"
        ep-wrong-name = "ncbench_broken_plugin.methods:Good"
        ep-good = "ncbench_broken_plugin.methods:Good"
        clip = "ncbench_broken_plugin.methods:FakeClip"
        twin = "ncbench_broken_plugin.methods:Twin"

        [project.entry-points."ncbench.datasets"]
        ep-no-load = "ncbench_broken_plugin.methods:NoLoad"

        [project.entry-points."ncbench.noises"]
        ep-not-callable = "ncbench_broken_plugin.methods:CONSTANT"
        ep-three-args = "ncbench_broken_plugin.noises:three_args"
        ep-next-image = "ncbench_broken_plugin.noises:next_image"
    """,
    "ncbench_broken_plugin/noises.py": """
        from ncbench.noise import NoisyPairing


        def three_args(caption_image, ratio, seed):
            return None


        def next_image(caption_image, ratio, seed, context=None):
            \"""Move the first floor(ratio N) captions to the next image (a test protocol).\"""
            assigned = caption_image.copy()
            n = int(ratio * len(assigned))
            assigned[:n] = (assigned[:n] + 1) % (caption_image.max() + 1)
            return NoisyPairing("next-image", ratio, seed, assigned, assigned == caption_image)
    """,
    "ncbench_broken_plugin/__init__.py": "",
    "ncbench_broken_plugin/missing.py": "import ncbench_no_such_module\n",
    "ncbench_broken_plugin/methods.py": HEADER + """
CONSTANT = 3


class NotAMethod:
    name = "ep-not-a-method"


class NoStep(Method):
    name = "ep-no-step"


@dataclass
class LooseParams:
    rate: float = 0.1


class Loose(CLIPFineTune):
    name = "ep-loose-params"
    Params = LooseParams


@dataclass(frozen=True)
class ListParams:
    sizes: list = field(default_factory=list)


class BadDefault(CLIPFineTune):
    name = "ep-bad-default"
    Params = ListParams


class Good(CLIPFineTune):
    name = "ep-good"
    description = "a working plugin beside broken ones"


class FakeClip(CLIPFineTune):
    name = "clip"


class Twin(CLIPFineTune):
    name = "twin"


class NoLoad(Dataset):
    name = "ep-no-load"
""",
}
TWIN_DIST = {
    "pyproject.toml": """
        [build-system]
        requires = ["setuptools>=64"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "ncbench-twin-plugin"
        version = "0.2"

        [project.entry-points."ncbench.methods"]
        twin = "ncbench_twin_plugin:Twin"
    """,
    "ncbench_twin_plugin/__init__.py": HEADER + """
class Twin(CLIPFineTune):
    name = "twin"
""",
}
DIST = "ncbench-broken-plugin 0.1"
EP_PROBLEMS = {  # the one line of each broken entry point
    "ep-import-error": f"method 'ep-import-error' ({DIST}, ncbench_broken_plugin.missing:Anything): failed to load: "
                       "ModuleNotFoundError: No module named 'ncbench_no_such_module'",
    "ep-not-a-method": f"method 'ep-not-a-method' ({DIST}, ncbench_broken_plugin.methods:NotAMethod): "
                       "is not a subclass of ncbench.method.Method",
    "ep-no-step": f"method 'ep-no-step' ({DIST}, ncbench_broken_plugin.methods:NoStep): "
                  "NoStep does not override the required hook training_step()",
    "ep-loose-params": f"method 'ep-loose-params' ({DIST}, ncbench_broken_plugin.methods:Loose): "
                       "Loose.Params must be a frozen dataclass (@dataclass(frozen=True))",
    "ep-bad-default": f"method 'ep-bad-default' ({DIST}, ncbench_broken_plugin.methods:BadDefault): "
                      "hyper-parameter sizes=[] is a list; expected bool, int, float, str",
    "ep-wrong-name": f"method 'ep-wrong-name' ({DIST}, ncbench_broken_plugin.methods:Good): "
                     "is registered as 'ep-wrong-name' but Good.name is 'ep-good'",
    "clip": f"method 'clip' ({DIST}, ncbench_broken_plugin.methods:FakeClip) is ignored: "
            "method 'clip' (built-in, ncbench.methods.clip:CLIPFineTune) wins",
    "twin": f"method 'twin' ({DIST} and ncbench-twin-plugin 0.2, ncbench_broken_plugin.methods:Twin and "
            "ncbench_twin_plugin:Twin): registered by two installed distributions; uninstall one",
    "ep-no-load": f"dataset 'ep-no-load' ({DIST}, ncbench_broken_plugin.methods:NoLoad): "
                  "NoLoad does not override the required hook load()",
    "ep-not-callable": f"noise protocol 'ep-not-callable' ({DIST}, ncbench_broken_plugin.methods:CONSTANT): "
                       "is not callable (got int 3)",
    "ep-three-args": f"noise protocol 'ep-three-args' ({DIST}, ncbench_broken_plugin.noises:three_args): "
                     "three_args(caption_image, ratio, seed) does not take (caption_image, ratio, seed, context)",
}


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory):
    """The two throwaway distributions pip-installed into a private folder, found through ``PYTHONPATH``."""
    root = tmp_path_factory.mktemp("dists")
    _write(root / "broken", BROKEN_DIST)
    _write(root / "twin", TWIN_DIST)
    _pip("install", "--no-deps", "--no-build-isolation", "--target", str(root / "site"),
         str(root / "broken"), str(root / "twin"))
    return {"PYTHONPATH": str(root / "site")}


@pytest.fixture(scope="module")
def broken_dist_listing(broken_site):
    return invoke("list", env={**WIDE, **broken_site})


@pytest.mark.parametrize("name", EP_PROBLEMS)
def test_broken_entry_point_is_one_warning_line_in_list(broken_dist_listing, name):
    proc = broken_dist_listing
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in _lines(proc.stderr, "warning:") if f"'{name}'" in line]
    assert lines == [f"warning: {EP_PROBLEMS[name]}"], proc.stderr


def test_broken_entry_points_do_not_hide_the_others(broken_dist_listing):
    proc = broken_dist_listing
    assert len(_lines(proc.stderr, "warning:")) == len(EP_PROBLEMS)
    assert DIST in _row(proc.stdout, "ep-good") and "beside broken ones" in _row(proc.stdout, "ep-good")
    assert "Move the first floor(ratio N) captions" in _row(proc.stdout, "ep-next-image")
    assert "built-in" in _row(proc.stdout, "clip") and "built-in" in _row(proc.stdout, "caption-shuffle")


def test_running_a_broken_entry_point_is_one_error_line(cli, broken_site):
    proc = cli("run", "--method", "ep-no-step", *MINI, env=broken_site)
    assert _one_error(proc) == f"error: {EP_PROBLEMS['ep-no-step']}"
    assert _lines(proc.stderr, "warning:") == [f"warning: {EP_PROBLEMS['clip']}"]


def test_noise_protocol_from_an_entry_point_makes_the_noise(cli, broken_site, tmp_path):
    """Only the named plugin is imported: the broken ones beside it stay silent."""
    proc = cli("noise", "make", "--noise-protocol", "ep-next-image", "--noise", "0.2", "--dataset", "synthetic-mini",
               "--cache-dir", tmp_path, env={**WIDE, **broken_site})
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
    assert "ep-next-image noise on synthetic-mini train: nominal 0.2, realised 0.2000 (400 of 2000 captions)" in proc.stdout
