"""The baselines a method's distribution gate is read against, measured on the same data and the same N.

A KID between n generated images and the real held-out set means nothing alone: it depends on n, on the
feature network and on how alike the held-out scans are. So the held-out set is cut in two: a
*reference* half R, which every method and baseline is compared with, and a *comparison* half A, from
which the baselines take exactly n items (the method's own sample count):

- ``floor``: real half A against R, the KID a perfect generator gets (real against real);
- ``noise``: half A with its voxels shuffled inside the body (same HU histogram, no anatomy) against R,
  what a generator that learned intensities but no structure gets;
- ``ceiling``: the autoencoder's reconstructions of half A against R (latent methods), the best a
  latent method can do through its decoder.

A working method's KID lies between the floor and the noise baseline, near the floor. KID is unbiased at
small N, and each value carries a bootstrap interval. Shapes: images [N, *S] (any unit), body masks
[N, *S] bool; ``features(images) -> [N, F]``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from lungsynth.eval.distribution import MetricResult, kid

Features = Callable[[np.ndarray], np.ndarray]


def halves(n_items: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices (comparison half A, reference half R) of ``n_items`` held-out items; A gets the odd one."""
    order = np.random.default_rng(seed).permutation(int(n_items))
    cut = (int(n_items) + 1) // 2
    return np.sort(order[:cut]), np.sort(order[cut:])


def shuffle_in_body(images: np.ndarray, bodies: np.ndarray, seed: int = 0) -> np.ndarray:
    """Each image with its voxel values permuted inside its body mask (outside untouched): [N, *S]."""
    rng = np.random.default_rng(seed)
    out = np.array(images, copy=True)
    for img, body in zip(out, np.asarray(bodies, dtype=bool)):
        values = img[body]
        img[body] = values[rng.permutation(len(values))]
    return out


def compare(reference: np.ndarray, features: np.ndarray, *, bootstrap: int = 0, seed: int = 0,
            network: str | None = None) -> MetricResult:
    """KID of ``features`` against the reference features, as a gate reads it (all items, one U-statistic)."""
    return kid(reference, features, subset_size=max(len(reference), len(features)), bootstrap=bootstrap,
               seed=seed, network=network, min_samples_warn=0)


@dataclass
class Baselines:
    """The floor, noise and (optional) ceiling KIDs of one unit at one N, with the reference half's features."""

    unit: str
    n: int
    network: str
    floor: MetricResult
    noise: MetricResult
    ceiling: MetricResult | None
    reference: np.ndarray  # features of the reference half R: what a method's samples are compared with

    def score(self, features: np.ndarray, *, bootstrap: int = 0, seed: int = 0) -> MetricResult:
        """A method's KID: its first ``n`` samples against the reference half (the baselines' N and R)."""
        if len(features) < self.n:
            raise ValueError(f"{len(features)} samples, but the baselines were measured at n = {self.n}; "
                             f"compare at the same N")
        return compare(self.reference, np.asarray(features)[: self.n], bootstrap=bootstrap, seed=seed,
                       network=self.network)

    def as_dict(self) -> dict[str, Any]:
        return {"unit": self.unit, "n": self.n, "network": self.network, "floor": self.floor.as_dict(),
                "noise": self.noise.as_dict(), "ceiling": self.ceiling.as_dict() if self.ceiling else None,
                "reference": np.asarray(self.reference, dtype=np.float64).tolist()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Baselines":
        metric = lambda m: MetricResult(**m) if m else None  # noqa: E731
        return cls(d["unit"], int(d["n"]), d["network"], metric(d["floor"]), metric(d["noise"]),
                   metric(d.get("ceiling")), np.asarray(d["reference"], dtype=np.float64))


def unit_baselines(unit: str, images: np.ndarray, bodies: np.ndarray, features: Features, n: int, *,
                   reconstructions: np.ndarray | None = None, network: str = "", bootstrap: int = 0,
                   seed: int = 0) -> Baselines:
    """The baselines of ``n`` items of ``unit`` (see the module docstring).

    Args:
        images: the real held-out items [N, *S]; bodies: their body masks [N, *S].
        reconstructions: the autoencoder's reconstructions of ``images`` (same order), for the ceiling.
        n: the method's sample count; half A must hold at least n items.
    """
    a, r = halves(len(images), seed)
    if len(a) < n or len(r) < 2:
        raise ValueError(f"{len(images)} held-out {unit} items give halves of {len(a)} and {len(r)}; the "
                         f"baselines at n = {n} need at least {2 * n} (prepare more scans)")
    a = a[:n]
    ref = np.asarray(features(images[r]))
    floor = compare(ref, features(images[a]), bootstrap=bootstrap, seed=seed, network=network)
    noise = compare(ref, features(shuffle_in_body(images[a], bodies[a], seed)), bootstrap=bootstrap, seed=seed,
                    network=network)
    ceiling = None
    if reconstructions is not None:
        ceiling = compare(ref, features(np.asarray(reconstructions)[a]), bootstrap=bootstrap, seed=seed,
                          network=network)
    return Baselines(unit, int(n), network, floor, noise, ceiling, ref)


def cached(path: Path | str, key: Mapping[str, Any], compute: Callable[[], Baselines]) -> Baselines:
    """The baselines stored at ``path`` under ``key`` (data fingerprint, unit, n, network, seed), computed
    and stored when missing, unreadable or made for another key."""
    from lungsynth.runtime import write_json_atomic

    path = Path(path)
    want = json.loads(json.dumps(dict(key), sort_keys=True))
    try:
        stored = json.loads(path.read_text())
        if stored.get("key") == want:
            return Baselines.from_dict(stored["baselines"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        pass
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"key": want, "baselines": value.as_dict()})
    return value
