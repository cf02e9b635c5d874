"""One package, pgcast: the editable install maps pgcast.api to ./api, and nothing imports the
folders as top-level packages any more (code written or merged in the old style fails here)."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def package_dirs() -> dict[str, str]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return dict(tomllib.load(f)["tool"]["setuptools"]["package-dir"])


def test_the_editable_install_resolves_each_subpackage_to_its_folder_here() -> None:
    mapping = package_dirs()
    assert set(mapping) == {"pgcast", "pgcast.api", "pgcast.bin", "pgcast.mail",
                            "pgcast.schema", "pgcast.sql", "pgcast.worker"}
    for name, folder in mapping.items():
        module = importlib.import_module(name)
        assert module.__file__ is not None
        assert Path(module.__file__).resolve().parent == (ROOT / folder).resolve(), name
    # from outside the checkout too (no current directory on sys.path to help)
    done = subprocess.run([sys.executable, "-c", "import pgcast.worker.engine as e; "
                           "print(e.__file__)"], cwd="/", capture_output=True, text=True,
                          check=True)
    assert Path(done.stdout.strip()) == ROOT / "worker" / "engine.py"


def test_no_module_imports_a_folder_as_a_top_level_package() -> None:
    tops = {folder for name, folder in package_dirs().items() if name != "pgcast"}
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard",
                            "*.py"], capture_output=True, text=True, check=True).stdout.split()
    old = []
    for rel in files:
        path = ROOT / rel
        if not path.is_file():
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            old += [f"{rel}:{node.lineno}: {n}" for n in names if n.split(".")[0] in tops]
    assert not old, "import them as pgcast.<folder> (from pgcast.worker import x): " + \
        "; ".join(old)


def test_every_subfolder_is_a_listed_package() -> None:
    # pyproject's `packages` is a list: a new subfolder left out of it would be left out of
    # the wheel (the editable install would still find it, so only the wheel would break)
    with (ROOT / "pyproject.toml").open("rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    found = set()
    for name, folder in package_dirs().items():
        for sub in [ROOT / folder, *(ROOT / folder).rglob("*")]:
            if sub.is_dir() and sub.name != "__pycache__" and any(
                    p.is_file() for p in sub.iterdir()):
                rel = sub.relative_to(ROOT / folder).parts
                found.add(".".join((name, *rel)))
    assert found == listed


def test_the_version_is_the_installed_distributions() -> None:
    from importlib import metadata

    import pgcast

    assert pgcast.__version__ == metadata.version("pgcast")
