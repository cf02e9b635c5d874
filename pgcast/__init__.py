"""pgcast: a Postgres-native email broadcast engine.

The subpackages live at the repository root (api/, worker/, sql/, schema/, mail/, bin/) and
are mapped into this package by the build configuration (pyproject.toml, package-dir):
`pgcast.worker` is the folder worker/, in a wheel and in an editable install alike.
"""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("pgcast")
except metadata.PackageNotFoundError:  # a checkout that was never installed
    __version__ = "unknown"
