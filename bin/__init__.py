"""Thin executables: the `pgcast` CLI and the demo."""
