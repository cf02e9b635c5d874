"""pgcast: a Postgres-native email broadcast engine.

The subpackages live at the repository root (api/, worker/, sql/, schema/, mail/, bin/) and
are mapped into this package by the build configuration (pyproject.toml, package-dir):
`pgcast.worker` is the folder worker/, in a wheel and in an editable install alike.
"""

from __future__ import annotations


def __getattr__(name: str) -> str:
    """`pgcast.__version__`, read from the installed metadata when asked: importing pgcast
    (every render process and command does) costs nothing (importlib.metadata: ~30 ms)."""
    if name != "__version__":
        raise AttributeError(f"module 'pgcast' has no attribute {name!r}")
    from importlib import metadata

    try:
        return metadata.version("pgcast")
    except metadata.PackageNotFoundError:  # a checkout that was never installed
        return "unknown"
