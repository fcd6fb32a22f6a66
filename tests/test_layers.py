"""The package's layer contracts: import-linter, configured in pyproject.toml [tool.importlinter]
and run by `make test` before pytest.

test_package_keeps_its_layer_contracts checks the real package. The others show the contracts
bite: they run lint-imports with the real configuration on a copy of src/diladiff into which one
forbidden import has been written (an import that goes up the layers, one inside a function, one
between independent siblings, a cycle) or a module that no layer lists; and on a stand-in package
built from the configured layers, which keeps them (passes) until a lowest-layer module imports
the top one (fails).

lint-imports reads the source and never imports it: no torch, a fraction of a second a run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
CONFIG = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]
ROOT_PACKAGE = CONFIG["root_package"]
(LAYERS_CONTRACT,) = [c for c in CONFIG["contracts"] if c["type"] == "layers"]


def lint_imports(cwd: Path, src: Path, config: Path) -> tuple[int, str]:
    """Runs lint-imports in a fresh interpreter, `src` first on the path (ahead of the editable
    install), and returns its exit status and output."""
    env = dict(os.environ, PYTHONPATH=str(src), COLUMNS="250", NO_COLOR="1")
    cmd = [sys.executable, "-c", "from importlinter.cli import lint_imports_command as c; c()"]
    done = subprocess.run(
        [*cmd, str(config), "--no-cache"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done.returncode, done.stdout + done.stderr


def test_package_keeps_its_layer_contracts():
    rc, out = lint_imports(ROOT, ROOT / "src", PYPROJECT)
    assert rc == 0, out
    n = len(CONFIG["contracts"])
    assert f"Contracts: {n} kept, 0 broken." in out


# ---------------------------------------------------------------------------------------------
# A copy of the real package with one forbidden import added.


def copy_package(dest: Path) -> Path:
    shutil.copytree(
        ROOT / "src" / ROOT_PACKAGE,
        dest / "src" / ROOT_PACKAGE,
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    shutil.copy(PYPROJECT, dest / "pyproject.toml")
    return dest


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> str:
    """lint-imports' output on an unmodified copy (today's violations, if any)."""
    root = copy_package(tmp_path_factory.mktemp("baseline"))
    return lint_imports(root, root / "src", root / "pyproject.toml")[1]


# (file in the package, text appended to it, what the report must then say)
FORBIDDEN = {
    "upward": ("config.py", "\nimport diladiff.cli\n", "diladiff.config -> diladiff.cli"),
    "upward-lazy": (
        "errors.py",
        "\n\ndef _late():\n    import diladiff.pipeline\n",
        "diladiff.errors -> diladiff.pipeline",
    ),
    "siblings": ("demo.py", "\nimport diladiff.check\n", "diladiff.demo -> diladiff.check"),
    # exhaustive: every direct submodule of the package has a layer.
    "unlisted": ("_unlisted.py", "", "- diladiff._unlisted"),
    "cycle": (
        "data/_cycle_a.py",
        "import diladiff.data._cycle_b\n",
        "No cycles are allowed in diladiff.data.",
    ),
}


@pytest.mark.parametrize("case", list(FORBIDDEN))
def test_forbidden_import_in_the_real_package_breaks_a_contract(case, tmp_path, baseline):
    path, text, expected = FORBIDDEN[case]
    assert expected not in baseline
    root = copy_package(tmp_path)
    pkg = root / "src" / ROOT_PACKAGE
    with open(pkg / path, "a") as f:
        f.write(text)
    if case == "cycle":
        (pkg / "data" / "_cycle_b.py").write_text("import diladiff.data._cycle_a\n")
    rc, out = lint_imports(root, root / "src", root / "pyproject.toml")
    assert rc == 1, out
    assert expected in out, out


# ---------------------------------------------------------------------------------------------
# A stand-in package: one empty package per configured layer module, each importing the whole
# layer below it (and the allowed sibling imports that the contract ignores).


def configured_layers() -> list[list[str]]:
    """The layers contract's modules, top layer first, as full names."""
    (container,) = LAYERS_CONTRACT.get("containers", [""])
    layers = []
    for layer in LAYERS_CONTRACT["layers"]:
        tails = [t.strip().strip("()") for t in re.split(r"[|:]", layer)]
        layers.append([f"{container}.{t}" if container else t for t in tails])
    return layers


def add_module(src: Path, name: str) -> Path:
    """Creates `name` as a package (and its parents) and returns its __init__.py."""
    folder = src
    for part in name.split("."):
        folder = folder / part
        folder.mkdir(exist_ok=True)
        (folder / "__init__.py").touch()
    return folder / "__init__.py"


def add_import(src: Path, importer: str, imported: str) -> None:
    add_module(src, imported)
    with open(add_module(src, importer), "a") as f:
        f.write(f"import {imported}\n")


def test_stand_in_package_passes_until_a_low_layer_imports_the_top(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    add_module(src, ROOT_PACKAGE)
    layers = configured_layers()
    for upper, lower in zip(layers, layers[1:] + [[]], strict=True):
        for importer in upper:
            add_module(src, importer)
            for imported in lower:
                add_import(src, importer, imported)
    for expression in LAYERS_CONTRACT.get("ignore_imports", []):
        importer, imported = (re.sub(r"\*\*?", "stub", s.strip()) for s in expression.split("->"))
        add_import(src, importer, imported)
    config = tmp_path / "pyproject.toml"
    shutil.copy(PYPROJECT, config)

    rc, out = lint_imports(tmp_path, src, config)
    assert rc == 0, out
    assert f"Contracts: {len(CONFIG['contracts'])} kept, 0 broken." in out

    top, low = layers[0][0], layers[-1][0]
    add_import(src, low, top)
    rc, out = lint_imports(tmp_path, src, config)
    assert rc == 1, out
    assert f"{low} is not allowed to import {top}" in out, out
    assert f"{low} -> {top}" in out, out


def readme_section(title: str) -> str:
    """The text of README.md's section `title` (up to the next heading of any level)."""
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n{title}\n")
    end = re.search(r"\n#{1,6} ", text[start + len(title) + 2 :])
    return text[start : start + len(title) + 2 + (end.start() if end else len(text))]


def test_readme_layers_list_the_configured_layers_in_order():
    """README's Layers list names the contract's layers, top to bottom, with the same
    separators ('|' independent siblings, ':' siblings that may import each other)."""
    items = re.findall(r"^\d+\. (.+)$", readme_section("### Layers"), flags=re.M)
    documented = [re.sub(r"\s*\(.*$", "", item).replace("`", "").strip() for item in items]
    configured = [re.sub(r"\s+", " ", layer).strip() for layer in LAYERS_CONTRACT["layers"]]
    assert documented == configured


def test_readme_layout_names_every_top_level_module_of_the_package():
    """Every module and subpackage directly under src/diladiff appears in README's Layout
    block, and the block names none that does not exist."""
    block = readme_section("## Layout").split("```")[1]
    package = ROOT / "src" / ROOT_PACKAGE
    actual = {
        p.stem if p.suffix == ".py" else p.name + "/"
        for p in package.iterdir()
        if (p.suffix == ".py" and p.stem not in ("__init__", "__main__"))
        or (p.is_dir() and (p / "__init__.py").is_file())
    }
    lines = block.strip("\n").splitlines()[1:]  # after "src/diladiff/"
    # Names in the block's first column (before the two-space gap that starts a description);
    # lines outside the package (e.g. docs/) end the package's part.
    named: set[str] = set()
    for line in lines:
        if line and not line.startswith("  "):
            break
        head = re.split(r"\s{3,}", line.strip())[0] if line.startswith("  ") else ""
        if line.startswith("  ") and not line.startswith("   "):
            for name in head.split():
                named.add(name.removesuffix(".py"))
    assert named == actual
