"""`make lint`'s mypy over the package as it is imported: `python -m tests.typecheck`.

pgcast's subpackages are folders at the repository root mapped into `pgcast` by
pyproject.toml's package-dir, which the editable install resolves with an import hook that
mypy does not read. So this lays out build/typecheck/pgcast/ as symbolic links to those
folders (read from pyproject.toml), runs mypy on `pgcast` there, and prints its paths as
the repository's (pgcast/api/app.py -> api/app.py).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / "build" / "typecheck"


def package_dirs() -> dict[str, str]:
    """pyproject.toml's package-dir: subpackage name -> folder ("pgcast.api" -> "api")."""
    with (ROOT / "pyproject.toml").open("rb") as f:
        config = tomllib.load(f)
    return dict(config["tool"]["setuptools"]["package-dir"])


def lay_out() -> dict[str, str]:
    """build/typecheck/pgcast/... as links; returns the path prefixes to translate back."""
    shutil.rmtree(TREE, ignore_errors=True)
    back: dict[str, str] = {}
    for name, folder in sorted(package_dirs().items()):
        if name == "pgcast":
            (TREE / "pgcast").mkdir(parents=True)
            (TREE / "pgcast" / "__init__.py").symlink_to(ROOT / folder / "__init__.py")
            back["pgcast/__init__.py"] = f"{folder}/__init__.py"
            continue
        link = TREE / Path(*name.split("."))
        link.symlink_to(ROOT / folder, target_is_directory=True)
        back["/".join(name.split(".")) + "/"] = folder.rstrip("/") + "/"
    return back


def main() -> int:
    back = lay_out()
    done = subprocess.run([sys.executable, "-m", "mypy", "--config-file",
                           str(ROOT / "pyproject.toml")], cwd=TREE, capture_output=True,
                          text=True, check=False)
    for stream, text in ((sys.stdout, done.stdout), (sys.stderr, done.stderr)):
        for line in text.splitlines(keepends=True):
            for prefix, folder in sorted(back.items(), key=lambda kv: -len(kv[0])):
                if line.startswith(prefix):
                    line = folder + line[len(prefix):]
                    break
            stream.write(line)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
