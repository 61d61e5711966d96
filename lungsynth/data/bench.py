"""``lungsynth bench data``: seconds to render and to prepare one phantom scan in a profile."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def bench_data(args: argparse.Namespace) -> int:
    """Render (phantom + DICOM write) and prepare the first default scan, ``--repeats`` times."""
    from lungsynth.runtime import measure
    from lungsynth.config import get_config, parse_overrides
    from lungsynth.data.lidc import get_scan
    from lungsynth.data.phantom import default_scan_ids, render_scan, write_dicom_series
    from lungsynth.data.preprocess import prepare

    cfg = get_config(args.profile, parse_overrides(args.overrides))
    sid = default_scan_ids(1)[0]
    scan = get_scan(sid)
    renders, writes, preps = [], [], []
    with tempfile.TemporaryDirectory(prefix="lungsynth-bench-data-") as tmp:
        for r in range(max(1, args.repeats)):
            root, out = Path(tmp) / f"dicom{r}", Path(tmp) / f"prepared{r}"
            with measure() as m_render:
                vol, _ = render_scan(scan, seed=cfg.data.phantom_seed, noise_hu=cfg.data.phantom_noise_hu,
                                     render_matrix=cfg.data.phantom_render_matrix)
            t0 = time.perf_counter()
            write_dicom_series(vol, scan, root)
            writes.append(time.perf_counter() - t0)
            with measure() as m_prep:
                prepare(root, out, cfg, scans=[sid], verbose=False)
            renders.append(m_render["seconds"])
            preps.append(m_prep["seconds"])
    best = lambda xs: min(xs)  # noqa: E731 - the least disturbed repeat
    print(f"bench data [{cfg.profile}] scan {scan.patient_id} ({len(scan.slice_zvals)} slices of 512x512), "
          f"{len(renders)} repeats (best):")
    print(f"  render phantom    {best(renders):7.2f} s")
    print(f"  write DICOM       {best(writes):7.2f} s")
    print(f"  prepare one scan  {best(preps):7.2f} s  (peak RSS {m_prep['peak_mb']:.0f} MB)")
    print(f"  total per scan    {best(renders) + best(writes) + best(preps):7.2f} s "
          f"-> {cfg.data.n_scans} scans ~ {cfg.data.n_scans * (best(renders) + best(writes) + best(preps)):.0f} s")
    return 0
