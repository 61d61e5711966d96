"""Where runs, datasets and checkpoints live.

Everything generated goes under one home directory: ``$LUNGSYNTH_HOME`` when set,
else the repository checkout (when lungsynth is installed from one), else
``~/.lungsynth``. Layout::

    <home>/data/generated/phantom_dicom/        the embedded default DICOM (all profiles)
    <home>/data/generated/<profile>/prepared/   prepared NIfTI + manifest + splits
    <home>/data/generated/<profile>/prepared@spacing_3d_mm=3.0/   one prepared with overridden settings
    <home>/runs/<profile>/<run>/                one folder per run: checkpoints, logs, run.json

The shipped tables (``data/*.csv``) live in the repository's ``data/`` folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

HOME_ENV = "LUNGSYNTH_HOME"
PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent


def _is_checkout(path: Path) -> bool:
    return (path / "pyproject.toml").is_file() and (path / "lungsynth").is_dir()


def home() -> Path:
    """The root of everything lungsynth writes."""
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser().resolve()
    if _is_checkout(REPO_DIR):
        return REPO_DIR
    return Path.home() / ".lungsynth"


def shipped_data_dir() -> Path:
    """The repository's ``data/`` folder with the derived tables that ship (read-only)."""
    return REPO_DIR / "data"


def notebooks_dir() -> Path:
    return REPO_DIR / "notebooks"


CHAPTER_NOTEBOOK = re.compile(r"^(\d\d)_([A-Za-z0-9_]+)\.ipynb$")


def chapter_notebooks(folder: Path | None = None) -> list[tuple[str, str, Path]]:
    """``(number, slug, path)`` of every ``NN_slug.ipynb`` in the notebooks folder, in chapter order."""
    found = []
    for path in sorted((folder or notebooks_dir()).glob("*.ipynb")):
        match = CHAPTER_NOTEBOOK.match(path.name)
        if match:
            found.append((match.group(1), match.group(2), path))
    return found


def generated_dir() -> Path:
    return home() / "data" / "generated"


def phantom_dicom_dir() -> Path:
    """DICOM root of the embedded phantom default (pylidc layout)."""
    return generated_dir() / "phantom_dicom"


def prepared_dir(profile: str) -> Path:
    """The prepared dataset of ``profile`` (NIfTI volumes, manifest, splits)."""
    return generated_dir() / profile / "prepared"


def variant_name(base: str, changed: Mapping[str, Any]) -> str:
    """``base`` when nothing ``changed``, else ``base@key=value+...`` with the last part of each dotted key
    (``05_hr_ldm_hist@train_steps=400``), a hash of the changes when that grows past 60 characters.

    The folder of something built with overridden settings sits beside the profile's and never over it."""
    if not changed:
        return base

    def short(key: str, value: Any) -> str:
        text = ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
        return f"{key.split('.')[-1]}={text}"

    suffix = "+".join(short(k, changed[k]) for k in sorted(changed))
    safe = "".join(ch if ch.isalnum() or ch in "=+,.-_" else "_" for ch in suffix)
    if len(safe) > 60:
        digest = hashlib.sha1(json.dumps(dict(changed), sort_keys=True, default=str).encode()).hexdigest()[:10]
        safe = f"{safe[:40]}-{digest}"
    return f"{base}@{safe}"


def runs_dir(profile: str) -> Path:
    return home() / "runs" / profile


def run_dir(profile: str, name: str, create: bool = True) -> Path:
    """``<home>/runs/<profile>/<name>``, e.g. ``run_dir("smoke", "02_vae3d")``."""
    path = runs_dir(profile) / name
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def ensure_dir(path: Path | str) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path
