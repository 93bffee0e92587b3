"""reportflow's version, from the installed package's metadata (pyproject.toml): what `reportflow --version`
prints and every span's service.version says."""

from __future__ import annotations

from importlib import metadata


def version() -> str:
    try:
        return metadata.version("reportflow")
    except metadata.PackageNotFoundError:
        return "0+unknown"  # run from a checkout that was never installed
