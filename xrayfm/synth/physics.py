"""Line integrals -> detected C-arm image: Beer-Lambert, automatic exposure, Poisson noise,
detector blur, vignetting, log display with edge enhancement, collimator and field masks.

``dose`` is the mean photon count per pixel behind the median-attenuating part of the open
field (what automatic exposure control holds constant), so the relative quantum noise in the
log image is about ``1 / sqrt(dose)`` there.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass
class Exposure:
    """Detector and display parameters of one image."""

    dose: float = 1000.0             # photons per pixel at the median open-field attenuation
    blur_px: float = 0.8             # scintillator / II unsharpness, Gaussian sigma in pixels at 256
    vignetting: float = 0.25         # relative brightness loss at the field edge
    collimator_mu_t: float = 2.5     # line integral added behind a collimator blade
    edge_gain: float = 0.6           # unsharp-mask gain of the display processing
    edge_sigma_px: float = 6.0       # unsharp-mask radius in pixels at 256
    compress: float = 0.6            # dynamic-range compression: fraction of the large-scale trend removed
    compress_sigma_px: float = 40.0  # its radius in pixels at 256
    gamma: float = 1.0               # display gamma on the normalised log image


def _gauss(img: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0.05:
        return img
    return cv2.GaussianBlur(img, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)


def _process(log_img: np.ndarray, exp: Exposure, scale: float) -> np.ndarray:
    """Display processing of a log image: large-scale range compression plus edge enhancement."""
    trend = _gauss(log_img, exp.compress_sigma_px * scale)
    detail = log_img - _gauss(log_img, exp.edge_sigma_px * scale)
    return log_img - exp.compress * (trend - float(trend.mean())) + exp.edge_gain * detail


def expose(line_int: np.ndarray, metal: np.ndarray, field: np.ndarray, open_beam: np.ndarray,
           exp: Exposure, rng: np.random.Generator) -> np.ndarray:
    """Simulate detection and display; returns float32 (H, W) in [0, 1], dense bright, 0 outside the field.

    ``line_int``: tissue line integrals; ``metal``: metal line integrals (same shape);
    ``field``: detector field weight (II circle); ``open_beam``: 1 where no collimator blade.
    """
    n = line_int.shape[0]
    scale = n / 256.0
    total = (line_int + metal + exp.collimator_mu_t * (1.0 - open_beam)).astype(np.float64)
    inside = (field > 0.5) & (open_beam > 0.5)
    ref = float(np.median(total[inside])) if inside.any() else float(np.median(total))
    i0 = exp.dose * np.exp(ref)
    yy, xx = np.mgrid[0:n, 0:n]
    r2 = ((xx + 0.5 - n / 2) ** 2 + (yy + 0.5 - n / 2) ** 2) / (n / 2) ** 2
    expected = i0 * np.exp(-total) * (1.0 - exp.vignetting * np.clip(r2, 0, 1))
    counts = rng.poisson(expected).astype(np.float32)
    blur = exp.blur_px * scale
    detected = np.maximum(_gauss(counts, blur), 0.5)
    clean = np.maximum(_gauss(expected.astype(np.float32), blur), 0.5)
    log_img = np.log(np.float32(i0)) - np.log(detected)
    log_clean = np.log(np.float32(i0)) - np.log(clean)
    enhanced = _process(log_img, exp, scale)
    enhanced_clean = _process(log_clean, exp, scale)
    # The display window comes from the noise-free image so that noise scales with dose only.
    body = inside & (metal < 1e-3)
    vals = enhanced_clean[body] if body.sum() > 16 else enhanced_clean.ravel()
    lo, hi = np.percentile(vals, [0.5, 99.7])
    disp = np.clip((enhanced - lo) / max(hi - lo, 1e-6), 0.0, 1.0) ** exp.gamma
    return (disp * field).astype(np.float32)
