import numpy as np
import pytest

from lungsynth.data.masks import classical_lung_mask, lung_mask


def chest(size: int = 48, lung_reaches_edge: bool = False) -> np.ndarray:
    """[D, H, W] HU toy chest: air around an elliptic body holding two lungs (ellipsoids)."""
    d, h, w = np.mgrid[:size, :size, :size].astype(np.float32)
    c = (size - 1) / 2
    hu = np.full((size, size, size), -1000.0, np.float32)
    body_a = 0.62 * size if lung_reaches_edge else 0.45 * size  # a body wider than the field of view
    body = ((w - c) / body_a) ** 2 + ((h - c) / (0.36 * size)) ** 2 <= 1
    hu[body] = 40.0
    lung_a = 0.3 * size if lung_reaches_edge else 0.14 * size
    for side in (-1, 1):
        cx = c + side * (0.3 * size if lung_reaches_edge else 0.2 * size)
        lung = ((w - cx) / lung_a) ** 2 + ((h - c) / (0.22 * size)) ** 2 + ((d - c) / (0.4 * size)) ** 2 <= 1
        hu[lung] = -850.0
    return hu


@pytest.mark.parametrize("reaches_edge", [False, True])
def test_classical_mask_finds_both_lungs(reaches_edge):
    hu = chest(lung_reaches_edge=reaches_edge)
    truth = hu == -850.0
    if reaches_edge:  # the lungs really do run into the field-of-view edge
        assert truth[:, :, 0].any() and truth[:, :, -1].any()
    mask = classical_lung_mask(hu, spacing_mm=6.0)
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice > 0.9
    assert not mask[0, 0, 0]  # the air around the body is never lung


def test_lung_mask_rejects_unknown_method():
    with pytest.raises(ValueError, match="unknown lung mask method"):
        lung_mask(chest(), 6.0, method="magic")


def test_a_parenchymal_island_is_lung_and_a_gas_bubble_is_not():
    """A pocket of lung tissue cut off from both lungs (the phantom grows one around a nodule near the
    mediastinum) is kept; a bubble of pure gas of the same size is not."""
    hu = chest()
    d, h, w = np.mgrid[:48, :48, :48]
    island = (d - 24) ** 2 + (h - 13) ** 2 + (w - 23.5) ** 2 <= 2.5**2  # between the lungs, anterior
    bubble = (d - 24) ** 2 + (h - 35) ** 2 + (w - 23.5) ** 2 <= 2.5**2  # the same size, posterior
    hu[island] = -800.0
    hu[bubble] = -1000.0
    mask = classical_lung_mask(hu, spacing_mm=6.0)
    assert mask[island].all() and not mask[bubble].any()


def test_slice_lung_mask_finds_the_lungs_of_one_slice_and_keeps_nodules_inside():
    from lungsynth.data.masks import slice_lung_mask

    hu = chest(64)[32].copy()
    truth = hu == -850.0
    assert truth[27:36, 14:23].all()
    hu[27:36, 14:23] = 30.0  # an 18 mm solid nodule in the left lung: more than the 6 mm closing can fill
    mask = slice_lung_mask(hu, spacing_mm=2.0)
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice > 0.95
    assert mask[27:36, 14:23].all()  # the nodule is inside the lung
    assert not mask[0, 0] and not mask[32, 32]  # neither the air around the body nor the mediastinum


def test_slice_lung_mask_drops_gas_and_refuses_a_volume():
    from lungsynth.data.masks import slice_lung_mask

    hu = np.full((64, 64), 40.0, np.float32)
    hu[20:30, 20:30] = -1000.0  # a gas pocket (bowel), not parenchyma
    assert not slice_lung_mask(hu, 2.0).any()
    with pytest.raises(ValueError, match=r"one slice \[H, W\]"):
        slice_lung_mask(chest(16), 2.0)


def test_slice_lung_mask_keeps_a_lung_that_reaches_the_corner_of_a_window():
    from lungsynth.data.masks import slice_lung_mask

    hu = chest(64)[32]
    window = hu[26:38, 14:24]  # a window cut inside the left lung: the lung fills its corners
    truth = window == -850.0
    assert truth[0, 0] and truth[-1, -1]
    mask = slice_lung_mask(window, spacing_mm=2.0)
    assert 2 * (mask & truth).sum() / (mask.sum() + truth.sum()) > 0.95
