"""X-ray augmentations on ``(1, H, W)`` float tensors in ``[0, 1]`` (dense tissue bright).

Every transform is a small class applied as ``t(img, g)`` with an explicit ``torch.Generator``
so a sample's views are a pure function of its seed (this is what makes resume exact and data
workers irrelevant). Each transform fires with probability ``p`` and returns a new tensor that
stays in ``[0, 1]``. Colour jitter of natural-image recipes becomes window/level, gamma and
contrast here; X-ray specific additions are quantum noise, polarity inversion and collimation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def uniform(g: torch.Generator, lo: float, hi: float) -> float:
    """One draw from U(lo, hi) on generator ``g``."""
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _check(img: Tensor, any_channels: bool = False) -> None:
    if img.ndim != 3 or not (any_channels or img.shape[0] == 1):
        raise ValueError(f"augmentations expect a (1, H, W) image tensor, got shape {tuple(img.shape)}")


class XrayTransform:
    """Base: fire with probability ``p``, then :meth:`apply`.

    ``geometric`` transforms only move pixels, so they also take ``(C, H, W)`` tensors: replayed
    with the same generator state on a coordinate map they say where each view pixel came from.
    """

    p: float = 1.0
    geometric: bool = False

    def __call__(self, img: Tensor, g: torch.Generator) -> Tensor:
        _check(img, any_channels=self.geometric)
        if self.p < 1.0 and float(torch.rand((), generator=g)) >= self.p:
            return img
        return self.apply(img, g).clamp_(0.0, 1.0)

    def apply(self, img: Tensor, g: torch.Generator) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define apply")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class RandomResizedCrop(XrayTransform):
    """Crop a random area fraction ``scale`` and aspect ``ratio``, resize to ``size`` x ``size``."""

    geometric = True

    def __init__(self, size: int, scale: tuple[float, float] = (0.4, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> None:
        self.size, self.scale, self.ratio = size, tuple(scale), tuple(ratio)

    def apply(self, img: Tensor, g: torch.Generator) -> Tensor:
        _, h, w = img.shape
        top, left, ch, cw = 0, 0, h, w
        for _ in range(10):
            area = h * w * uniform(g, *self.scale)
            aspect = math.exp(uniform(g, math.log(self.ratio[0]), math.log(self.ratio[1])))
            cw_try, ch_try = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < cw_try <= w and 0 < ch_try <= h:
                ch, cw = ch_try, cw_try
                top = int(torch.randint(0, h - ch + 1, (), generator=g))
                left = int(torch.randint(0, w - cw + 1, (), generator=g))
                break
        else:  # no valid box in 10 tries (extreme aspect): central square crop
            ch = cw = min(h, w)
            top, left = (h - ch) // 2, (w - cw) // 2
        crop = img[None, :, top:top + ch, left:left + cw]
        return F.interpolate(crop, size=(self.size, self.size), mode="bilinear", antialias=True,
                             align_corners=False)[0]


class RandomFlip(XrayTransform):
    """Horizontal flip with ``p_horizontal``, vertical flip with ``p_vertical`` (independent)."""

    geometric = True

    def __init__(self, p_horizontal: float = 0.5, p_vertical: float = 0.0) -> None:
        self.p_horizontal, self.p_vertical = p_horizontal, p_vertical

    def apply(self, img: Tensor, g: torch.Generator) -> Tensor:
        out = img
        if float(torch.rand((), generator=g)) < self.p_horizontal:
            out = out.flip(-1)
        if float(torch.rand((), generator=g)) < self.p_vertical:
            out = out.flip(-2)
        return out.clone() if out is img else out


class RandomRotation(XrayTransform):
    """Rotate by U(-max_degrees, max_degrees) about the centre; uncovered corners become black."""

    geometric = True

    def __init__(self, max_degrees: float = 10.0, p: float = 0.5) -> None:
        self.max_degrees, self.p = max_degrees, p

    def apply(self, img: Tensor, g: torch.Generator) -> Tensor:
        a = math.radians(uniform(g, -self.max_degrees, self.max_degrees))
        _, h, w = img.shape
        # affine_grid works in normalised coordinates; correct for the aspect ratio.
        theta = torch.tensor([[math.cos(a), -math.sin(a) * h / w, 0.0],
                              [math.sin(a) * w / h, math.cos(a), 0.0]], dtype=img.dtype)
        grid = F.affine_grid(theta[None], [1, 1, h, w], align_corners=False)
        return F.grid_sample(img[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]


class RandomWindowLevel(XrayTransform):
    """Random display window: width U(width) of the full range, level anywhere it fits."""

    def __init__(self, width: tuple[float, float] = (0.5, 1.0), p: float = 0.8) -> None:
        self.width, self.p = tuple(width), p

    def apply(self, img: Tensor, g: torch.Generator) -> Tensor:
        w = uniform(g, *self.width)
        lo = uniform(g, min(0.0, 1.0 - w), max(0.0, 1.0 - w))
        return (img - lo) / w


class RandomGamma(XrayTransform):
    """``img ** gamma`` with log-uniform gamma in ``gamma``."""

    def __init__(self, gamma: tuple[float, float] = (0.7, 1.5), p: float = 0.8) -> None:
        self.gamma, self.p = tuple(gamma), p

    def apply(self, img: Tensor, g: torch.Generator) -> Tensor:
        gamma = math.exp(uniform(g, math.log(self.gamma[0]), math.log(self.gamma[1])))
        return img.clamp(min=0.0).pow(gamma)


class RandomContrastBrightness(XrayTransform):
    """Scale contrast about the mean by U(contrast) and shift by U(brightness)."""

    def __init__(self, contrast: tuple[float, float] = (0.7, 1.3),
                 brightness: tuple[float, float] = (-0.1, 0.1), p: float = 0.8) -> None:
        self.contrast, self.brightness, self.p = tuple(contrast), tuple(brightness), p

    def apply(self, img: Tensor, g: torch.Generator) -> Tensor:
        c, b = uniform(g, *self.contrast), uniform(g, *self.brightness)
        mean = img.mean()
        return (img - mean) * c + mean + b


class GaussianBlur(XrayTransform):
    """Separable Gaussian blur with sigma U(sigma) pixels (reflect padding)."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0), p: float = 0.5) -> None:
        self.sigma, self.p = tuple(sigma), p

    def apply(self, img: Tensor, g: torch.Generator) -> Tensor:
        sigma = uniform(g, *self.sigma)
        _, h, w = img.shape
        radius = max(1, min(math.ceil(3 * sigma), (min(h, w) - 1) // 2))
        t = torch.arange(-radius, radius + 1, dtype=img.dtype)
        k = torch.exp(-0.5 * (t / sigma) ** 2)
        k = k / k.sum()
        x = F.pad(img[None], (radius, radius, radius, radius), mode="reflect")
        x = F.conv2d(x, k.view(1, 1, 1, -1))
        return F.conv2d(x, k.view(1, 1, -1, 1))[0]


class QuantumNoise(XrayTransform):
    """Poisson-like quantum noise in the attenuation domain.

    With ``x`` proportional to attenuation, detected counts are ``N exp(-k x)`` and the noise of
    ``x`` is Gaussian with ``sigma = exp(k x / 2) / (k sqrt(N))``: bright (dense) regions are
    noisier. ``N`` (photons per pixel for air) is log-uniform in ``photons``.
    """

    def __init__(self, photons: tuple[float, float] = (300.0, 20000.0), k: float = 3.0,
                 p: float = 0.5) -> None:
        self.photons, self.k, self.p = tuple(photons), k, p

    def apply(self, img: Tensor, g: torch.Generator) -> Tensor:
        n = math.exp(uniform(g, math.log(self.photons[0]), math.log(self.photons[1])))
        sigma = torch.exp(img * (self.k / 2)) / (self.k * math.sqrt(n))
        return img + sigma * torch.randn(img.shape, generator=g, dtype=img.dtype)


class InvertPolarity(XrayTransform):
    """``1 - img``: the MONOCHROME1 look (rare by default)."""

    def __init__(self, p: float = 0.02) -> None:
        self.p = p

    def apply(self, img: Tensor, g: torch.Generator) -> Tensor:
        return 1.0 - img


class Solarize(XrayTransform):
    """Invert pixels at or above ``threshold``."""

    def __init__(self, threshold: float = 0.5, p: float = 0.2) -> None:
        self.threshold, self.p = threshold, p

    def apply(self, img: Tensor, g: torch.Generator) -> Tensor:
        return torch.where(img >= self.threshold, 1.0 - img, img)


class Collimation(XrayTransform):
    """Black borders of a collimated field: random straight margins, or a circular C-arm field."""

    def __init__(self, max_margin: float = 0.2, p_circle: float = 0.3, p: float = 0.3) -> None:
        self.max_margin, self.p_circle, self.p = max_margin, p_circle, p

    def apply(self, img: Tensor, g: torch.Generator) -> Tensor:
        _, h, w = img.shape
        keep = torch.ones(h, w, dtype=torch.bool)
        if float(torch.rand((), generator=g)) < self.p_circle:
            yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
            cy = h / 2 + uniform(g, -0.1, 0.1) * h
            cx = w / 2 + uniform(g, -0.1, 0.1) * w
            r = uniform(g, 0.45, 0.7) * min(h, w)
            keep = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        else:
            top, bottom, left, right = (int(uniform(g, 0.02, self.max_margin) * n) for n in (h, h, w, w))
            keep[:top] = keep[h - bottom:] = False
            keep[:, :left] = keep[:, w - right:] = False
        return img * keep


class Pipeline:
    """Apply transforms in order with one generator."""

    def __init__(self, transforms: Sequence[XrayTransform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, img: Tensor, g: torch.Generator) -> Tensor:
        for t in self.transforms:
            img = t(img, g)
        return img

    def __repr__(self) -> str:
        return "Pipeline(" + ", ".join(repr(t) for t in self.transforms) + ")"


def source_coordinates(pipeline: Pipeline, shape: tuple[int, int], g: torch.Generator) -> Tensor:
    """Where each pixel of the view ``pipeline(img, g)`` comes from in ``img`` of ``shape`` (H, W).

    Returns ``(3, S, S)``: the source pixel's x and y (pixel centres, in units of the image's
    longer side, so distances are isotropic) and a coverage channel (1 inside the image, 0 in
    corners a rotation uncovered). It replays the pipeline's leading geometric transforms on a
    coordinate map with a copy of ``g``'s state; call it just before the view, ``g`` is not advanced.
    """
    h, w = shape
    side = max(h, w)
    ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / side, (torch.arange(w) + 0.5) / side, indexing="ij")
    grid = torch.stack([xs, ys, torch.ones(h, w)])
    replay = torch.Generator()
    replay.set_state(g.get_state())
    for t in pipeline.transforms:
        if not t.geometric:
            break
        grid = t(grid, replay)
    return grid
