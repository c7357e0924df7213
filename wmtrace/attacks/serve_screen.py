"""Query screening: the server answers inputs that look unusual at random, and natural ones truly.

A leaker who suspects black-box tracing can screen queries: boundary queries are blends of two
images on which the model hesitates, unlike what users send. Two detectors, both calibrated on the
attacker's own natural inputs so that a chosen fraction of natural inputs (`fraction`, the share of
ordinary users the leaker is willing to answer at random) is flagged:

  confidence  the model's max-softmax below its `fraction` quantile on natural inputs (the model
              hesitates: the boundary queries' very construction)
  statistics  simple image statistics (mean, std, mean absolute gradient, share of background
              pixels) at a Mahalanobis distance from the natural ones' above their (1 - fraction)
              quantile (a blend of two images has more foreground and softer edges)
  either      flagged by one or the other, each calibrated at fraction / 2

A flagged input is answered with a uniformly random probability vector (Dirichlet(1): its top-1 is
a uniformly random class), as logits (its log); every other input gets the copy's own answer. The
random answers are drawn from `seed` and differ from call to call.
"""

from __future__ import annotations

import numpy as np

from ..errors import BadInput
from .base import Param, check_fraction, seed_param
from .serving import Predict, ServingAttack, softmax

DETECTORS = ("confidence", "statistics", "either")


def statistics(x: np.ndarray) -> np.ndarray:
    """(n, 4) per-image statistics: mean, std, mean absolute gradient, share of pixels within 5% of the
    value range above the image's minimum (background)."""
    flat = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    img = np.asarray(x, dtype=np.float64)
    img = img.reshape(len(x), -1, *img.shape[-2:]) if img.ndim >= 3 else img.reshape(len(x), 1, 1, -1)
    grad = np.abs(np.diff(img, axis=-1)).mean((1, 2, 3)) + (
        np.abs(np.diff(img, axis=-2)).mean((1, 2, 3)) if img.shape[-2] > 1 else 0.0)
    lo, hi = flat.min(1, keepdims=True), flat.max(1, keepdims=True)
    background = (flat <= lo + 0.05 * np.maximum(hi - lo, 1e-12)).mean(1)
    return np.stack([flat.mean(1), flat.std(1), grad, background], axis=1)


class Screen:
    """The detector(s) calibrated on `natural` inputs through `predict`; `flag(x, logits)` says which
    inputs are answered at random."""

    def __init__(self, predict: Predict, natural: np.ndarray, fraction: float, detector: str) -> None:
        check_fraction(fraction, "screen")
        if detector not in DETECTORS:
            raise BadInput(f"screen: detector {detector!r}: use one of {', '.join(DETECTORS)}")
        if len(natural) < 20:
            raise BadInput(f"screen: {len(natural)} natural inputs are too few to calibrate on (20 or more)")
        self.detector = detector
        share = fraction / 2 if detector == "either" else fraction
        confidence = softmax(predict(natural)).max(1)
        self.min_confidence = float(np.quantile(confidence, share)) if share > 0 else -np.inf
        stats = statistics(natural)
        self.mean = stats.mean(0)
        cov = np.cov(stats, rowvar=False) + 1e-9 * np.eye(stats.shape[1])
        self.precision = np.linalg.inv(cov)
        self.max_distance = float(np.quantile(self._distance(natural), 1 - share)) if share > 0 else np.inf

    def _distance(self, x: np.ndarray) -> np.ndarray:
        d = statistics(x) - self.mean
        return np.einsum("ni,ij,nj->n", d, self.precision, d)

    def flag(self, x: np.ndarray, logits: np.ndarray) -> np.ndarray:
        flagged = np.zeros(len(x), bool)
        if self.detector in ("confidence", "either"):
            flagged |= softmax(logits).max(1) < self.min_confidence
        if self.detector in ("statistics", "either"):
            flagged |= self._distance(x) > self.max_distance
        return flagged


def screen(predict: Predict, natural: np.ndarray, fraction: float = 0.05, detector: str = "confidence",
           seed: int = 0) -> Predict:
    """`predict` behind query screening (see the module): flagged inputs get random answers."""
    s = Screen(predict, np.asarray(natural, dtype=np.float32), fraction, detector)
    rng = np.random.default_rng(seed)

    def screened(x: np.ndarray) -> np.ndarray:
        logits = np.asarray(predict(x), dtype=np.float64)
        flagged = s.flag(x, logits)
        if flagged.any():
            p = rng.dirichlet(np.ones(logits.shape[1]), int(flagged.sum()))
            logits[flagged] = np.log(np.maximum(p, np.finfo(np.float64).tiny))
        return logits.astype(np.float32)

    screened.screen = s  # type: ignore[attr-defined]  # the calibrated thresholds, for reports and tests
    return screened


SERVING = ServingAttack(
    name="screen",
    summary="Answer queries that look unusual (low confidence, odd image statistics) with a random answer.",
    params=(
        Param("fraction", float, 0.05, "Share of natural inputs flagged, answered at random (calibrated)"),
        Param("detector", str, "confidence", "confidence (max-softmax) | statistics (image statistics) | either",
              choices=DETECTORS),
        seed_param("Random seed of the random answers"),
    ),
    wrap=lambda predict, data, fraction, detector, seed: screen(predict, data, fraction, detector, seed),
    needs_data=True,
)
