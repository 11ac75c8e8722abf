"""Procedural, captioned, class-conditional shapes: the data set that ships with the code.

Every image holds one anti-aliased shape on a plain or gradient background. The
class is the shape; colour, size, position, rotation and background vary. Each
image has one caption naming its attributes, e.g. ``"a small red star at the top
left on a dark background"``.

Everything is drawn from one ``torch.Generator`` seeded by the split's seed, all
attributes first (one vector per attribute, in a fixed order) and then rendered
in chunks, so the result does not depend on the chunk size. Rendering evaluates
signed distances in pixel units and turns them into coverage with a one-pixel
ramp (``alpha = clamp(0.5 - d, 0, 1)``), which anti-aliases the edges.

Geometry (``R`` = resolution, pixel centres at ``i + 0.5``):
- each shape is defined in unit coordinates (y up) inside the unit disc, so at
  radius ``r`` pixels it never leaves the disc of radius ``r`` around its centre;
- the centre is drawn inside the shape's feasible range ``[r + margin, R - r - margin]``
  on each axis; that range is cut into thirds and the caption's position names
  the third on each axis (``"top left"`` ... ``"bottom right"``), so a large shape
  "at the top left" is as far to the top left as it can go;
- rotation is uniform in ``[-max_rotation, max_rotation]`` degrees, small enough
  that a square stays distinct from the (elongated) diamond and a cross from an X.

Files written by :func:`write_split` (one folder per split):
``images.npy`` (uint8 ``[N, 3, R, R]``), ``labels.npy`` (int64 ``[N]``),
``captions.json`` (list of N strings), ``attributes.json`` (one list per attribute)
and ``manifest.json`` (counts, class names, the config, sha256 of each file).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, ValidationInfo, field_validator, model_validator
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from demar.config import StrictConfig
from demar.images import to_unit
from demar.io import atomic_write_bytes, read_json, write_json

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "Attributes",
    "Background",
    "EmbeddedConfig",
    "EmbeddedDataset",
    "caption_colour",
    "caption_of",
    "colour_accuracy",
    "named_colour",
    "captions",
    "draw_attributes",
    "generate",
    "position_of",
    "render",
    "shape_point",
    "write_split",
]

FORMAT = "demar-embedded-shapes"
VERSION = 1


# --------------------------------------------------------------------------- vocabulary

SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "heart",
    "diamond",
    "hexagon",
    "ring",
    "arrow",
)
"""Class names; the label of an image is the index of its shape here."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 220, 40),
    "green": (50, 180, 70),
    "cyan": (40, 200, 210),
    "blue": (40, 80, 220),
    "purple": (140, 60, 200),
    "pink": (240, 110, 180),
}
"""Named shape colours (RGB); each image jitters its colour by up to ``colour_jitter`` per channel."""

SIZES: dict[str, tuple[float, float]] = {
    "small": (0.18, 0.21),
    "medium": (0.25, 0.28),
    "large": (0.32, 0.35),
}
"""Size name -> range of the shape's radius as a fraction of the resolution."""

POSITIONS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
"""Row-major 3x3 cells of the centre's feasible range (index = 3 * row + column)."""

_POSITION_PHRASES = {
    "top left": "at the top left",
    "top": "at the top",
    "top right": "at the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "at the bottom left",
    "bottom": "at the bottom",
    "bottom right": "at the bottom right",
}


@dataclass(frozen=True)
class Background:
    """A background: caption phrase and RGB colours at the top and bottom row (equal for a plain one)."""

    phrase: str
    top: tuple[int, int, int]
    bottom: tuple[int, int, int]


BACKGROUNDS: dict[str, Background] = {
    "dark": Background("a dark background", (25, 25, 35), (25, 25, 35)),
    "light": Background("a light background", (232, 232, 222), (232, 232, 222)),
    "night": Background("a dark blue gradient", (12, 18, 60), (40, 60, 95)),
    "mist": Background("a pale gradient", (245, 245, 250), (185, 195, 210)),
}
"""Background name -> colours; gradients run vertically from ``top`` to ``bottom``."""


# --------------------------------------------------------------------------- config


class EmbeddedConfig(StrictConfig):
    """The embedded shapes data set (``data.embedded`` in params.yaml).

    Attributes:
        resolution: image side in pixels (default 32).
        num_train: images in the training split (default 20000).
        num_reference: images in the held-out reference split (default 5000).
        train_seed: seed of the training split (default 0).
        reference_seed: seed of the reference split, distinct from ``train_seed`` (default 1).
        max_rotation: largest rotation in degrees, either way (default 30).
        colour_jitter: largest change of each colour channel of the shape (default 15).
        background_jitter: largest change of each background channel (default 8).
        margin: pixels kept free between a shape and the image border (default 1.0).
        colours: the colour names drawn from (default all of :data:`COLOURS`).
        sizes: the size names drawn from (default all of :data:`SIZES`).
        positions: the position names drawn from (default all of :data:`POSITIONS`).
        backgrounds: the background names drawn from (default all of :data:`BACKGROUNDS`).
        chunk_size: images rendered at once; changes memory, not the result (default 1024).

    The four name lists narrow the nuisance variation around the class (the shape).
    Each attribute is still drawn with one uniform integer per image, so a list that
    names every value gives the same images as the default.
    """

    resolution: int = Field(32, ge=16)
    num_train: int = Field(20000, ge=1)
    num_reference: int = Field(5000, ge=1)
    train_seed: int = 0
    reference_seed: int = 1
    max_rotation: float = Field(30.0, ge=0, le=45)
    colour_jitter: int = Field(15, ge=0, le=40)
    background_jitter: int = Field(8, ge=0, le=20)
    margin: float = Field(1.0, ge=0)
    colours: list[str] = Field(default_factory=lambda: list(COLOURS), min_length=1)
    sizes: list[str] = Field(default_factory=lambda: list(SIZES), min_length=1)
    positions: list[str] = Field(default_factory=lambda: list(POSITIONS), min_length=1)
    backgrounds: list[str] = Field(default_factory=lambda: list(BACKGROUNDS), min_length=1)
    chunk_size: int = Field(1024, ge=1)

    @field_validator("colours", "sizes", "positions", "backgrounds")
    @classmethod
    def _known_names(cls, names: list[str], info: ValidationInfo) -> list[str]:
        vocabulary = {"colours": COLOURS, "sizes": SIZES, "positions": POSITIONS, "backgrounds": BACKGROUNDS}
        known = list(vocabulary[info.field_name])
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"unknown {info.field_name} {unknown} (known: {', '.join(known)})")
        if len(set(names)) != len(names):
            raise ValueError(f"{info.field_name} names a value more than once: {names}")
        return names

    @model_validator(mode="after")
    def _distinct_seeds(self) -> EmbeddedConfig:
        if self.train_seed == self.reference_seed:
            raise ValueError("train_seed and reference_seed must differ (the splits would be identical)")
        return self

    def split_seed(self, split: str) -> int:
        """The seed of ``split`` (``"train"`` or ``"reference"``)."""
        return {"train": self.train_seed, "reference": self.reference_seed}[split]

    def split_size(self, split: str) -> int:
        """The number of images of ``split`` (``"train"`` or ``"reference"``)."""
        return {"train": self.num_train, "reference": self.num_reference}[split]


# --------------------------------------------------------------------------- shapes in unit coordinates


def _regular_polygon(n: int, radius: float, phase_deg: float) -> np.ndarray:
    a = np.deg2rad(phase_deg + 360.0 * np.arange(n) / n)
    return np.stack([radius * np.cos(a), radius * np.sin(a)], axis=1)


def _star(points: int, outer: float, inner: float) -> np.ndarray:
    a = np.deg2rad(90.0 + 180.0 * np.arange(2 * points) / points)
    r = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)


def _cross(arm: float, half_width: float) -> np.ndarray:
    a, w = arm, half_width
    return np.array(
        [(w, w), (w, a), (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w), (-w, -a), (w, -a), (w, -w), (a, -w), (a, w)]
    )


def _heart(vertices: int) -> np.ndarray:
    # The classic parametric heart, scaled into the unit disc and centred on its bounding box.
    t = np.linspace(0.0, 2.0 * np.pi, vertices, endpoint=False)
    x = 16.0 * np.sin(t) ** 3
    y = 13.0 * np.cos(t) - 5.0 * np.cos(2 * t) - 2.0 * np.cos(3 * t) - np.cos(4 * t)
    pts = np.stack([x, y], axis=1)
    pts -= (pts.max(0) + pts.min(0)) / 2.0
    return pts * (0.97 / np.linalg.norm(pts, axis=1).max())


def _arrow() -> np.ndarray:
    # Pointing right: a shaft and a triangular head.
    return np.array(
        [(-0.95, 0.25), (0.15, 0.25), (0.15, 0.62), (0.95, 0.0), (0.15, -0.62), (0.15, -0.25), (-0.95, -0.25)]
    )


_POLYGONS: dict[str, np.ndarray] = {
    "square": _regular_polygon(4, 1.0, 45.0),
    "triangle": _regular_polygon(3, 1.0, 90.0),
    "star": _star(5, 1.0, 0.42),
    "cross": _cross(0.95, 0.3),
    "heart": _heart(48),
    "diamond": np.array([(0.0, 1.0), (-0.62, 0.0), (0.0, -1.0), (0.62, 0.0)]),
    "hexagon": _regular_polygon(6, 0.97, 0.0),
    "arrow": _arrow(),
}
_CIRCLE_RADIUS = 0.9
_RING_RADIUS, _RING_HALF_WIDTH = 0.72, 0.2


def _polygon_sdf(px: torch.Tensor, py: torch.Tensor, verts: torch.Tensor) -> torch.Tensor:
    """Signed distance (negative inside) of points ``[..., P]`` to a closed polygon ``[K, 2]``."""
    vx, vy = verts[:, 0], verts[:, 1]  # [K]
    ex, ey = torch.roll(vx, -1) - vx, torch.roll(vy, -1) - vy  # edge vectors [K]
    wx, wy = px[..., None] - vx, py[..., None] - vy  # [..., P, K]
    t = ((wx * ex + wy * ey) / (ex * ex + ey * ey)).clamp(0.0, 1.0)
    dist = torch.sqrt((wx - ex * t) ** 2 + (wy - ey * t) ** 2).amin(-1)  # [..., P]
    # Crossing number: a horizontal ray to the right crosses an odd number of edges inside.
    vy1 = torch.roll(vy, -1)
    straddles = (vy <= py[..., None]) != (vy1 <= py[..., None])
    x_cross = vx + ex * (py[..., None] - vy) / torch.where(ey == 0, torch.ones_like(ey), ey)
    inside = (straddles & (px[..., None] < x_cross)).sum(-1) % 2 == 1
    return torch.where(inside, -dist, dist)


def _shape_sdf(shape: str, px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """Signed distance in unit coordinates of ``shape`` at points ``px, py`` (y up)."""
    if shape == "circle":
        return torch.sqrt(px * px + py * py) - _CIRCLE_RADIUS
    if shape == "ring":
        return (torch.sqrt(px * px + py * py) - _RING_RADIUS).abs() - _RING_HALF_WIDTH
    verts = torch.as_tensor(_POLYGONS[shape], dtype=px.dtype)
    return _polygon_sdf(px, py, verts)


def shape_point(shape: str) -> tuple[float, float]:
    """A point (unit coordinates, y up) well inside ``shape``: where its colour can be read.

    Args:
        shape: a name from :data:`SHAPES`.
    """
    if shape == "ring":
        return (0.0, _RING_RADIUS)
    return (0.0, 0.0)


# --------------------------------------------------------------------------- attributes


@dataclass(frozen=True)
class Attributes:
    """The drawn attributes of ``N`` images, one tensor per attribute.

    Attributes:
        shape: class index into :data:`SHAPES` ``[N]`` (int64).
        colour: index into :data:`COLOURS` ``[N]``.
        size: index into :data:`SIZES` ``[N]``.
        position: index into :data:`POSITIONS` ``[N]``.
        background: index into :data:`BACKGROUNDS` ``[N]``.
        cx, cy: centre in pixels (x right, y down) ``[N]`` (float32).
        radius: shape radius in pixels ``[N]``.
        angle: rotation in degrees, counter-clockwise ``[N]``.
        rgb: the jittered shape colour ``[N, 3]`` (int64 in [0, 255]).
        bg_top, bg_bottom: the jittered background colours ``[N, 3]``.
    """

    shape: torch.Tensor
    colour: torch.Tensor
    size: torch.Tensor
    position: torch.Tensor
    background: torch.Tensor
    cx: torch.Tensor
    cy: torch.Tensor
    radius: torch.Tensor
    angle: torch.Tensor
    rgb: torch.Tensor
    bg_top: torch.Tensor
    bg_bottom: torch.Tensor

    def __len__(self) -> int:
        return len(self.shape)

    def slice(self, start: int, stop: int) -> Attributes:
        """The attributes of images ``start:stop``."""
        return Attributes(**{k: v[start:stop] for k, v in self.__dict__.items()})

    def to_columns(self) -> dict[str, list]:
        """JSON-ready columns: names for the categorical attributes, numbers for the rest."""
        names = {
            "shape": SHAPES,
            "colour": list(COLOURS),
            "size": list(SIZES),
            "position": POSITIONS,
            "background": list(BACKGROUNDS),
        }
        cols: dict[str, list] = {k: [names[k][i] for i in getattr(self, k).tolist()] for k in names}
        for k in ("cx", "cy", "radius", "angle"):
            cols[k] = [round(v, 4) for v in getattr(self, k).tolist()]
        for k in ("rgb", "bg_top", "bg_bottom"):
            cols[k] = getattr(self, k).tolist()
        return cols


def _uniform(n: int, lo: torch.Tensor | float, hi: torch.Tensor | float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


def _jitter(base: torch.Tensor, amount: int, g: torch.Generator) -> torch.Tensor:
    noise = torch.randint(-amount, amount + 1, base.shape, generator=g)
    return (base + noise).clamp(0, 255)


def _choose(allowed: list[str], vocabulary: list[str], num: int, g: torch.Generator) -> torch.Tensor:
    """Indices into ``vocabulary`` of ``num`` names drawn uniformly from ``allowed``."""
    pick = torch.randint(len(allowed), (num,), generator=g)
    return torch.tensor([vocabulary.index(name) for name in allowed], dtype=torch.long)[pick]


def draw_attributes(cfg: EmbeddedConfig, num: int, seed: int) -> Attributes:
    """Draw the attributes of ``num`` images from a generator seeded with ``seed``.

    Classes are balanced: labels are ``arange(num) % len(SHAPES)`` in a random order.

    Args:
        cfg: the data set config (resolution, rotation, jitters, margin).
        num: number of images.
        seed: seed of the ``torch.Generator`` every attribute is drawn from.
    """
    g = torch.Generator().manual_seed(seed)
    res = cfg.resolution
    shape = (torch.arange(num) % len(SHAPES))[torch.randperm(num, generator=g)]
    colour = _choose(cfg.colours, list(COLOURS), num, g)
    size = _choose(cfg.sizes, list(SIZES), num, g)
    position = _choose(cfg.positions, list(POSITIONS), num, g)
    background = _choose(cfg.backgrounds, list(BACKGROUNDS), num, g)

    size_lo = torch.tensor([lo for lo, _ in SIZES.values()], dtype=torch.float64)[size]
    size_hi = torch.tensor([hi for _, hi in SIZES.values()], dtype=torch.float64)[size]
    radius = _uniform(num, size_lo, size_hi, g) * res
    # Centre: uniform within the caption's third of the feasible range on each axis.
    lo, hi = radius + cfg.margin, res - radius - cfg.margin
    third = (hi - lo) / 3.0
    row, col = position // 3, position % 3
    cx = _uniform(num, lo + col * third, lo + (col + 1) * third, g)
    cy = _uniform(num, lo + row * third, lo + (row + 1) * third, g)
    angle = _uniform(num, -cfg.max_rotation, cfg.max_rotation, g)

    palette = torch.tensor(list(COLOURS.values()))
    rgb = _jitter(palette[colour], cfg.colour_jitter, g)
    tops = torch.tensor([b.top for b in BACKGROUNDS.values()])
    bottoms = torch.tensor([b.bottom for b in BACKGROUNDS.values()])
    shift = torch.randint(-cfg.background_jitter, cfg.background_jitter + 1, (num, 1), generator=g)
    bg_top = (tops[background] + shift).clamp(0, 255)
    bg_bottom = (bottoms[background] + shift).clamp(0, 255)
    f32 = torch.float32
    return Attributes(
        shape,
        colour,
        size,
        position,
        background,
        cx.to(f32),
        cy.to(f32),
        radius.to(f32),
        angle.to(f32),
        rgb,
        bg_top,
        bg_bottom,
    )


def caption_of(shape: str, colour: str, size: str, position: str, background: str) -> str:
    """The caption of one image, e.g. ``"a small red star at the top left on a dark background"``.

    Args:
        shape: a name from :data:`SHAPES`.
        colour: a name from :data:`COLOURS`.
        size: a name from :data:`SIZES`.
        position: a name from :data:`POSITIONS`.
        background: a name from :data:`BACKGROUNDS`.
    """
    return f"a {size} {colour} {shape} {_POSITION_PHRASES[position]} on {BACKGROUNDS[background].phrase}"


def captions(attrs: Attributes) -> list[str]:
    """The captions of all images of ``attrs``."""
    cols = attrs.to_columns()
    keys = ("shape", "colour", "size", "position", "background")
    return [caption_of(*(cols[k][i] for k in keys)) for i in range(len(attrs))]


# --------------------------------------------------------------------------- rendering


def render(attrs: Attributes, resolution: int) -> torch.Tensor:
    """Render images from their attributes.

    Args:
        attrs: the attributes of ``B`` images.
        resolution: image side ``R`` in pixels.

    Returns:
        uint8 ``[B, 3, R, R]``.
    """
    b = len(attrs)
    coords = torch.arange(resolution, dtype=torch.float32) + 0.5
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")  # [R, R] pixel centres
    xs, ys = xs.reshape(1, -1), ys.reshape(1, -1)  # [1, P]
    # Background: vertical blend from the top colour to the bottom colour.
    frac = (ys / resolution).reshape(1, 1, -1)  # [1, 1, P]
    top, bottom = attrs.bg_top.float()[:, :, None], attrs.bg_bottom.float()[:, :, None]  # [B, 3, 1]
    image = top + (bottom - top) * frac  # [B, 3, P]
    # Shape: pixel offsets -> unit coordinates of the rotated shape (y up).
    theta = torch.deg2rad(attrs.angle)[:, None]  # [B, 1]
    r = attrs.radius[:, None]  # [B, 1]
    dx, dy = xs - attrs.cx[:, None], -(ys - attrs.cy[:, None])  # [B, P], y up
    cos, sin = torch.cos(theta), torch.sin(theta)
    ux, uy = (cos * dx + sin * dy) / r, (-sin * dx + cos * dy) / r  # rotate by -theta, scale
    alpha = torch.zeros(b, xs.shape[1])  # [B, P]
    for k, name in enumerate(SHAPES):
        sel = attrs.shape == k
        if sel.any():
            sdf_px = _shape_sdf(name, ux[sel], uy[sel]) * r[sel]  # signed distance in pixels
            alpha[sel] = (0.5 - sdf_px).clamp(0.0, 1.0)
    alpha = alpha[:, None, :]  # [B, 1, P]
    image = image * (1 - alpha) + attrs.rgb.float()[:, :, None] * alpha
    return image.round().clamp(0, 255).to(torch.uint8).reshape(b, 3, resolution, resolution)


def generate(cfg: EmbeddedConfig, split: str, *, progress: bool = True) -> tuple[torch.Tensor, Attributes, list[str]]:
    """Generate one split.

    Args:
        cfg: the data set config.
        split: ``"train"`` or ``"reference"`` (selects size and seed).
        progress: show a tqdm bar (default True).

    Returns:
        ``(images uint8 [N, 3, R, R], attributes, captions)``.
    """
    num = cfg.split_size(split)
    attrs = draw_attributes(cfg, num, cfg.split_seed(split))
    images = torch.empty(num, 3, cfg.resolution, cfg.resolution, dtype=torch.uint8)
    for start in tqdm(range(0, num, cfg.chunk_size), desc=f"render {split}", disable=not progress):
        stop = min(num, start + cfg.chunk_size)
        images[start:stop] = render(attrs.slice(start, stop), cfg.resolution)
    return images, attrs, captions(attrs)


# --------------------------------------------------------------------------- files


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_split(cfg: EmbeddedConfig, split: str, out_dir: str | os.PathLike[str], *, progress: bool = True) -> dict:
    """Generate ``split`` and write it to ``out_dir`` (created); returns its manifest.

    Args:
        cfg: the data set config.
        split: ``"train"`` or ``"reference"``.
        out_dir: folder of the split; its files are written atomically, the manifest last.
        progress: show a tqdm bar (default True).
    """
    out = Path(out_dir)
    images, attrs, caps = generate(cfg, split, progress=progress)
    files = {
        "images.npy": _npy_bytes(images.numpy()),
        "labels.npy": _npy_bytes(attrs.shape.numpy().astype(np.int64)),
        "captions.json": (json.dumps(caps) + "\n").encode(),
        "attributes.json": (json.dumps(attrs.to_columns()) + "\n").encode(),
    }
    for name, data in files.items():
        atomic_write_bytes(out / name, data)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "split": split,
        "seed": cfg.split_seed(split),
        "num_images": len(attrs),
        "resolution": cfg.resolution,
        "classes": list(SHAPES),
        "class_counts": torch.bincount(attrs.shape, minlength=len(SHAPES)).tolist(),
        "config": cfg.model_dump(),
        "sha256": {name: _sha256(data) for name, data in files.items()},
    }
    write_json(out / "manifest.json", manifest)
    return manifest


class EmbeddedDataset(Dataset):
    """One split written by :func:`write_split`: ``ds[i] -> (image, label, caption)``.

    Args:
        root: the split's folder (holding ``manifest.json``).
        output: ``"uint8"`` for uint8 ``[3, R, R]`` images, ``"float"`` for float32 in [-1, 1] (default ``"float"``).
        verify: check the files' sha256 against the manifest when opening (default False).

    Attributes:
        classes: class names (label ``i`` is ``classes[i]``); ``num_classes`` their number.
        resolution: the image side; ``manifest`` the split's manifest.
    """

    def __init__(
        self, root: str | os.PathLike[str], output: Literal["uint8", "float"] = "float", verify: bool = False
    ) -> None:
        self.root = Path(root)
        self.manifest = read_json(self.root / "manifest.json")
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{self.root / 'manifest.json'} is not an embedded shapes split")
        if output not in ("uint8", "float"):
            raise ValueError(f"output must be 'uint8' or 'float', not {output!r}")
        if verify:
            for name, digest in self.manifest["sha256"].items():
                if _sha256((self.root / name).read_bytes()) != digest:
                    raise ValueError(f"{self.root / name}: sha256 does not match {self.root / 'manifest.json'}")
        self.output = output
        self.images = np.load(self.root / "images.npy", mmap_mode="r")
        self.labels = np.load(self.root / "labels.npy")
        self.captions: list[str] = read_json(self.root / "captions.json")
        self.classes: list[str] = list(self.manifest["classes"])
        self.num_classes = len(self.classes)
        self.resolution = int(self.manifest["resolution"])

    def __len__(self) -> int:
        return len(self.labels)

    def attributes(self) -> dict[str, list]:
        """The stored attribute columns (see :meth:`Attributes.to_columns`)."""
        return read_json(self.root / "attributes.json")

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        image = torch.from_numpy(np.array(self.images[i]))  # uint8 [3, R, R]
        if self.output == "float":
            image = to_unit(image)  # [-1, 1]
        return image, int(self.labels[i]), self.captions[i]


def position_of(cx: float, cy: float, radius: float, resolution: int, margin: float) -> str:
    """The caption position of a centre ``(cx, cy)``: the third of the feasible range on each axis.

    Args:
        cx, cy: centre in pixels (x right, y down).
        radius: shape radius in pixels.
        resolution: image side in pixels.
        margin: border margin in pixels (as in :class:`EmbeddedConfig`).
    """
    lo, hi = radius + margin, resolution - radius - margin
    col = min(2, max(0, math.floor(3 * (cx - lo) / (hi - lo))))
    row = min(2, max(0, math.floor(3 * (cy - lo) / (hi - lo))))
    return POSITIONS[3 * row + col]


# --------------------------------------------------------------------------- colour of a drawn shape

_SHAPE_DISTANCE = 60.0
"""RGB distance from the background estimate beyond which a pixel counts as the shape's."""


def named_colour(image: torch.Tensor) -> str | None:
    """The :data:`COLOURS` name nearest the shape's colour in ``image`` (uint8 ``[3, H, W]``), or None.

    The background is estimated as the median of the border pixels (shapes keep a
    margin from the border); the shape's pixels are those farther than 60 in RGB from
    it, and their median colour is matched to the nearest named colour. None when no
    pixel stands out (no shape was drawn).
    """
    pixels = image.float().permute(1, 2, 0)  # [H, W, 3]
    border = torch.cat([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])  # [4R, 3]
    background = border.median(dim=0).values  # [3]
    flat = pixels.reshape(-1, 3)
    shape = flat[(flat - background).norm(dim=1) > _SHAPE_DISTANCE]  # [n, 3]
    if len(shape) == 0:
        return None
    colour = shape.median(dim=0).values  # [3]
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32)  # [8, 3]
    return list(COLOURS)[int((palette - colour).norm(dim=1).argmin())]


def caption_colour(caption: str) -> str | None:
    """The :data:`COLOURS` name a caption asks for (its first colour word), or None."""
    return next((word for word in caption.split() if word in COLOURS), None)


def colour_accuracy(images: Sequence[torch.Tensor], captions: Sequence[str]) -> float | None:
    """Fraction of images whose shape has the colour their caption names (None if no caption names one).

    Args:
        images: uint8 ``[3, H, W]`` each.
        captions: the caption each image was drawn from.
    """
    pairs = [(image, caption_colour(c)) for image, c in zip(images, captions, strict=True)]
    asked = [(image, colour) for image, colour in pairs if colour is not None]
    if not asked:
        return None
    return sum(named_colour(image) == colour for image, colour in asked) / len(asked)
