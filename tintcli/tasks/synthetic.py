"""Procedural image-classification tasks: tint's offline stand-in for the real eight.

Each family mirrors one real benchmark task's *kind* of visual skill (stroke shapes,
periodic textures, coloured symbols, scene layout, overhead land patterns, fine-grained
silhouettes) so that experts fine-tuned on different families pull a shared encoder in
different directions, which is what makes merging interfere. Every image is rendered from
a seed with vectorised signed-distance fields, so generation is fast and exactly
reproducible. Class identity is carried by geometry or texture; colour, position, scale,
clutter and noise are nuisances.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Renderer = Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class SynthFamily:
    """One procedural task: its classes and the function that draws them."""

    name: str
    like: str  # the real task it stands in for
    num_classes: int
    render: Renderer  # (labels [N], size, generator) -> float images [N, 3, H, W] in [0, 1]


# --------------------------------------------------------------------------- primitives


def _uniform(n: int, low: float, high: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g) * (high - low) + low


def _coords(n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates in [-1, 1], shaped [1, H, W] to broadcast over a batch."""
    axis = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    return xx[None], yy[None]


def _local(xx, yy, cx, cy, scale, angle):
    """Coordinates in a per-sample frame that is shifted, scaled and rotated."""
    cx, cy, scale, angle = (t[:, None, None] for t in (cx, cy, scale, angle))
    dx, dy = (xx - cx) / scale, (yy - cy) / scale
    cos, sin = torch.cos(angle), torch.sin(angle)
    return dx * cos + dy * sin, -dx * sin + dy * cos


def _fill(sdf: torch.Tensor, softness: float = 0.04) -> torch.Tensor:
    """Anti-aliased coverage of the region where sdf < 0."""
    return torch.clamp(0.5 - sdf / softness, 0.0, 1.0)


def _segment_distance(px, py, seg: torch.Tensor) -> torch.Tensor:
    """Distance from points [N,H,W] to segments seg [N,S,4] -> [N,S,H,W]."""
    ax, ay, bx, by = (seg[..., i, None, None] for i in range(4))
    px, py = px[:, None], py[:, None]
    vx, vy = bx - ax, by - ay
    t = ((px - ax) * vx + (py - ay) * vy) / (vx * vx + vy * vy + 1e-8)
    t = t.clamp(0, 1)
    return torch.hypot(px - ax - t * vx, py - ay - t * vy)


def _polygon_sdf(px, py, sides: int, rotation: float = 0.0) -> torch.Tensor:
    """Signed distance to a regular polygon of circumradius 1 (negative inside)."""
    angle = torch.atan2(py, px) - rotation
    sector = 2 * math.pi / sides
    a = torch.remainder(angle + sector / 2, sector) - sector / 2
    r = torch.hypot(px, py)
    return r * torch.cos(a) - math.cos(math.pi / sides)


def _smooth_noise(n: int, size: int, cells: int, g: torch.Generator, channels: int = 1):
    """Low-frequency noise in [0, 1]: random cells upsampled bicubically."""
    coarse = torch.rand(n, channels, cells, cells, generator=g)
    up = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return up.clamp(0, 1)


def _random_colors(n: int, g: torch.Generator, low: float = 0.0, high: float = 1.0):
    return _uniform(n * 3, low, high, g).view(n, 3)


def _paint(canvas: torch.Tensor, mask: torch.Tensor, color: torch.Tensor) -> torch.Tensor:
    """Alpha-blend a colour ([N,3] or [N,3,H,W]) into canvas [N,3,H,W] where mask [N,H,W]."""
    if color.dim() == 2:
        color = color[:, :, None, None]
    m = mask[:, None]
    return canvas * (1 - m) + color * m


def _finish(img: torch.Tensor, g: torch.Generator, noise: float = 0.04) -> torch.Tensor:
    """Shared photometric nuisances: contrast, brightness and sensor noise."""
    n = img.shape[0]
    contrast = _uniform(n, 0.75, 1.15, g)[:, None, None, None]
    brightness = _uniform(n, -0.1, 0.1, g)[:, None, None, None]
    img = (img - 0.5) * contrast + 0.5 + brightness
    img = img + noise * torch.randn(img.shape, generator=g)
    return img.clamp(0, 1)


# --------------------------------------------------------------------------- digits

# Seven-segment skeletons in a [-0.5,0.5] x [-1,1] box: a b c d e f g.
_SEGMENTS = torch.tensor(
    [
        [-0.5, -1, 0.5, -1],  # a top
        [0.5, -1, 0.5, 0],  # b top right
        [0.5, 0, 0.5, 1],  # c bottom right
        [-0.5, 1, 0.5, 1],  # d bottom
        [-0.5, 0, -0.5, 1],  # e bottom left
        [-0.5, -1, -0.5, 0],  # f top left
        [-0.5, 0, 0.5, 0],  # g middle
    ]
)
_DIGIT_SEGMENTS = torch.tensor(
    [
        [1, 1, 1, 1, 1, 1, 0],
        [0, 1, 1, 0, 0, 0, 0],
        [1, 1, 0, 1, 1, 0, 1],
        [1, 1, 1, 1, 0, 0, 1],
        [0, 1, 1, 0, 0, 1, 1],
        [1, 0, 1, 1, 0, 1, 1],
        [1, 0, 1, 1, 1, 1, 1],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 0, 1, 1],
    ],
    dtype=torch.bool,
)


def _digit_mask(labels, xx, yy, cx, cy, scale, g, thickness=(0.10, 0.2), jitter=0.08):
    """Hand-drawn-looking digit strokes: jittered, slanted seven-segment skeletons."""
    n = labels.shape[0]
    seg = _SEGMENTS[None].repeat(n, 1, 1) + jitter * torch.randn(n, 7, 4, generator=g)
    slant = _uniform(n, -0.35, 0.35, g)[:, None]
    seg[..., 0] -= slant * seg[..., 1]
    seg[..., 2] -= slant * seg[..., 3]
    px, py = _local(xx, yy, cx, cy, scale, torch.zeros(n))
    dist = _segment_distance(px, py, seg)
    dist = dist.masked_fill(~_DIGIT_SEGMENTS[labels][:, :, None, None], 1e3).amin(1)
    width = _uniform(n, *thickness, g)[:, None, None]
    return _fill(dist * scale[:, None, None] - width * scale[:, None, None])


def render_digits(labels, size, g):
    """MNIST-like: one pale stroke digit on a dark background."""
    n = labels.shape[0]
    xx, yy = _coords(n, size)
    mask = _digit_mask(
        labels, xx, yy, _uniform(n, -0.15, 0.15, g), _uniform(n, -0.1, 0.1, g),
        _uniform(n, 0.55, 0.75, g), g,
    )
    ink = _uniform(n, 0.8, 1.0, g)[:, None].expand(n, 3)
    canvas = torch.full((n, 3, size, size), 0.05) + 0.05 * _smooth_noise(n, size, 4, g)
    return _finish(_paint(canvas, mask, ink), g, noise=0.05)


def render_house_numbers(labels, size, g):
    """SVHN-like: a coloured centre digit, cropped neighbours, cluttered backgrounds."""
    n = labels.shape[0]
    xx, yy = _coords(n, size)
    canvas = _smooth_noise(n, size, 3, g, channels=3) * 0.5 + 0.25
    # ink contrasts with the background: dark ink on light walls, light ink on dark ones
    light_wall = canvas.mean((1, 2, 3)) > 0.5
    ink = torch.where(light_wall[:, None], _random_colors(n, g, 0.0, 0.3),
                      _random_colors(n, g, 0.7, 1.0))
    scale = _uniform(n, 0.55, 0.65, g)
    thick = (0.16, 0.26)
    for side in (-1.0, 1.0):
        neighbour = torch.randint(0, 10, (n,), generator=g)
        present = (torch.rand(n, generator=g) < 0.25).float()[:, None, None]
        offset = side * (scale * 1.7 + _uniform(n, 0.15, 0.3, g))
        mask = _digit_mask(neighbour, xx, yy, offset, _uniform(n, -0.1, 0.1, g), scale, g, thick)
        canvas = _paint(canvas, mask * present, ink)
    mask = _digit_mask(labels, xx, yy, _uniform(n, -0.08, 0.08, g), _uniform(n, -0.08, 0.08, g),
                       scale, g, thick)
    canvas = _paint(canvas, mask, ink)
    return _finish(canvas, g, noise=0.06)


# --------------------------------------------------------------------------- textures


def _texture_field(kind: int, px, py, freq, g) -> torch.Tensor:
    """A periodic or stochastic pattern in [0, 1] for texture class ``kind``."""
    n = px.shape[0]
    f = freq[:, None, None]
    if kind < 8:  # stripes: 4 orientations x 2 frequencies
        angle = (kind % 4) * math.pi / 4
        f = f * (1.0 if kind < 4 else 2.2)
        u = px * math.cos(angle) + py * math.sin(angle)
        return (torch.sin(u * f * math.pi) > 0).float()
    if kind in (8, 9):  # checkerboard
        f = f * (1.0 if kind == 8 else 2.0)
        return ((torch.sin(px * f * math.pi) * torch.sin(py * f * math.pi)) > 0).float()
    if kind in (10, 11):  # dot lattice
        f = f * (1.0 if kind == 10 else 1.8)
        d = torch.hypot(torch.sin(px * f * math.pi / 2), torch.sin(py * f * math.pi / 2))
        return (d < 0.55).float()
    if kind == 12:  # concentric rings
        return (torch.sin(torch.hypot(px, py) * f * math.pi * 1.5) > 0).float()
    if kind == 13:  # crosshatch
        a = torch.sin((px + py) * f * math.pi) > 0.6
        b = torch.sin((px - py) * f * math.pi) > 0.6
        return (a | b).float()
    if kind == 14:  # zigzag
        zig = torch.abs(torch.remainder(px * f, 2.0) - 1.0)
        return (torch.sin((py + 0.5 * zig) * f * math.pi * 1.5) > 0).float()
    if kind == 15:  # blotches
        return (_smooth_noise(n, px.shape[-1], 6, g)[:, 0] > 0.5).float()
    if kind == 16:  # radial spokes
        return (torch.sin(torch.atan2(py, px) * 6) > 0).float()
    if kind == 17:  # waves
        return (torch.sin((py + 0.25 * torch.sin(px * f * math.pi)) * f * math.pi) > 0).float()
    if kind == 18:  # bricks
        row = torch.floor(py * f)
        shifted = px * f / 2 + 0.5 * torch.remainder(row, 2)
        mortar = (torch.remainder(py * f, 1.0) < 0.2) | (torch.remainder(shifted, 1.0) < 0.12)
        return mortar.float()
    # speckle
    return (torch.rand(px.shape, generator=g) > 0.7).float()


TEXTURE_CLASSES = 20


def render_textures(labels, size, g):
    """DTD-like: a periodic pattern in random colours; the pattern is the class."""
    n = labels.shape[0]
    xx, yy = _coords(n, size)
    # centres stay near the middle: rings and spokes seen from a corner look like blotches
    px, py = _local(
        xx, yy, _uniform(n, -0.4, 0.4, g), _uniform(n, -0.4, 0.4, g), torch.ones(n),
        _uniform(n, -0.15, 0.15, g),
    )
    freq = _uniform(n, 2.6, 3.4, g)
    field = torch.zeros(n, size, size)
    for kind in range(TEXTURE_CLASSES):
        idx = (labels == kind).nonzero().flatten()
        if len(idx):
            field[idx] = _texture_field(kind, px[idx], py[idx], freq[idx], g)
    a, b = _random_colors(n, g), _random_colors(n, g)
    canvas = a[:, :, None, None].expand(n, 3, size, size).clone()
    return _finish(_paint(canvas, field, b), g, noise=0.05)


# --------------------------------------------------------------------------- signs

_SIGN_SHAPES = [  # (sides, rotation, border colour)
    (40, 0.0, (0.85, 0.1, 0.1)),  # circle, red
    (3, -math.pi / 2, (0.85, 0.1, 0.1)),  # triangle up, red
    (3, math.pi / 2, (0.85, 0.1, 0.1)),  # triangle down, red
    (4, math.pi / 4, (0.85, 0.1, 0.1)),  # diamond, red (an octagon is a circle at 32 px)
    (40, 0.0, (0.1, 0.25, 0.85)),  # circle, blue
    (4, 0.0, (0.95, 0.75, 0.1)),  # square, yellow
]
SIGN_CLASSES = len(_SIGN_SHAPES) * 4


def _glyph_sdf(kind: torch.Tensor, px, py) -> torch.Tensor:
    """Inner symbols: horizontal bar, vertical bar, dot, arrow head."""
    bar_h = torch.maximum(px.abs() - 0.4, py.abs() - 0.1)
    bar_v = torch.maximum(px.abs() - 0.1, py.abs() - 0.4)
    dot = torch.hypot(px, py) - 0.22
    arrow = _polygon_sdf(px / 0.35, py / 0.35, 3, 0.0) * 0.35
    options = torch.stack([bar_h, bar_v, dot, arrow], 1)
    return options.gather(1, kind[:, None, None, None].expand(-1, 1, *px.shape[1:]))[:, 0]


def render_signs(labels, size, g):
    """GTSRB-like: a bordered sign shape with an inner glyph on street clutter."""
    n = labels.shape[0]
    xx, yy = _coords(n, size)
    canvas = _smooth_noise(n, size, 4, g, channels=3) * 0.7 + 0.1
    px, py = _local(
        xx, yy, _uniform(n, -0.1, 0.1, g), _uniform(n, -0.1, 0.1, g),
        _uniform(n, 0.75, 0.92, g), _uniform(n, -0.1, 0.1, g),
    )
    shape, glyph = labels // 4, labels % 4
    outer = torch.zeros(n, size, size)
    border = torch.zeros(n, 3)
    for i, (sides, rot, color) in enumerate(_SIGN_SHAPES):
        idx = (shape == i).nonzero().flatten()
        outer[idx] = _polygon_sdf(px[idx], py[idx], sides, rot)
        border[idx] = torch.tensor(color)
    light = _uniform(n, 0.6, 1.0, g)[:, None]
    canvas = _paint(canvas, _fill(outer * 0.75, 0.05), border * light)
    canvas = _paint(canvas, _fill((outer + 0.3) * 0.75, 0.05), 0.95 * light.expand(n, 3))
    glyph_mask = _fill(_glyph_sdf(glyph, px / 1.3, py / 1.3) * 0.75, 0.05)
    canvas = _paint(canvas, glyph_mask, 0.05 * light.expand(n, 3))
    return _finish(canvas, g, noise=0.05)


# --------------------------------------------------------------------------- scenes

_SKIES = [((0.35, 0.6, 0.95), (0.7, 0.85, 1.0)), ((0.95, 0.5, 0.2), (0.5, 0.2, 0.45)),
          ((0.02, 0.03, 0.15), (0.1, 0.1, 0.3))]
_GROUNDS = [(0.2, 0.55, 0.15), (0.85, 0.75, 0.45), (0.1, 0.3, 0.6), (0.35, 0.35, 0.38)]
SCENE_CLASSES = len(_SKIES) * len(_GROUNDS) * 2


def render_scenes(labels, size, g):
    """SUN397-like: sky, ground and objects; the class is the combination of all three."""
    n = labels.shape[0]
    xx, yy = _coords(n, size)
    sky, ground, objects = labels // 8, (labels // 2) % 4, labels % 2
    horizon = _uniform(n, -0.2, 0.35, g)[:, None, None]
    top = torch.tensor([_SKIES[i][0] for i in sky])[:, :, None, None]
    bottom = torch.tensor([_SKIES[i][1] for i in sky])[:, :, None, None]
    t = ((yy + 1) / 2)[:, None]
    canvas = top * (1 - t) + bottom * t
    canvas = canvas + 0.1 * (torch.rand(n, 3, 1, 1, generator=g) - 0.5)
    ground_color = torch.tensor([_GROUNDS[i] for i in ground])
    ground_color = ground_color + 0.08 * torch.randn(n, 3, generator=g)
    texture = 0.15 * (_smooth_noise(n, size, 8, g) - 0.5)
    canvas = _paint(canvas, _fill(horizon - yy, 0.03), ground_color[:, :, None, None] + texture)
    for _ in range(3):
        ox = _uniform(n, -0.9, 0.9, g)[:, None, None]
        height = _uniform(n, 0.25, 0.6, g)[:, None, None]
        present = (torch.rand(n, generator=g) < 0.8).float()[:, None, None]
        trunk_y = (yy - horizon + height / 2).abs() - height / 2
        trunk = torch.maximum((xx - ox).abs() - 0.05, trunk_y)
        crown = torch.hypot(xx - ox, yy - horizon + height) - 0.22
        tree = torch.minimum(trunk, crown)
        building = torch.maximum((xx - ox).abs() - 0.18, (yy - horizon + height).abs() - height)
        sdf = torch.where(objects[:, None, None] == 0, tree, building)
        color = torch.where(
            objects[:, None] == 0, torch.tensor([0.05, 0.3, 0.08]), torch.tensor([0.55, 0.5, 0.5])
        ) + 0.1 * torch.randn(n, 3, generator=g)
        canvas = _paint(canvas, _fill(sdf, 0.03) * present, color)
    return _finish(canvas, g, noise=0.04)


# --------------------------------------------------------------------------- overhead imagery


def _overhead_layer(kind: str, xx, yy, g) -> torch.Tensor:
    """Masks of man-made or natural structures seen from above."""
    n = xx.shape[0] if xx.shape[0] > 1 else None
    n = n or 1
    if kind == "grid":  # road grid
        f = _uniform(n, 2.5, 4.0, g)[:, None, None]
        ph = _uniform(n, 0, 1, g)[:, None, None]
        roads = (torch.remainder(xx * f + ph, 1) < 0.18) | (torch.remainder(yy * f + ph, 1) < 0.18)
        return roads.float()
    if kind == "road":  # one straight highway
        a = _uniform(n, 0, math.pi, g)[:, None, None]
        off = _uniform(n, -0.4, 0.4, g)[:, None, None]
        return _fill((xx * torch.cos(a) + yy * torch.sin(a) - off).abs() - 0.1, 0.04)
    if kind == "river":  # meandering band
        amp, ph = _uniform(n, 0.2, 0.4, g)[:, None, None], _uniform(n, 0, 6.28, g)[:, None, None]
        centre = amp * torch.sin(yy * 3 + ph)
        return _fill((xx - centre).abs() - 0.16, 0.05)
    if kind == "circles":  # centre-pivot farmland
        r = torch.hypot(torch.remainder(xx + 1, 1.0) - 0.5, torch.remainder(yy + 1, 1.0) - 0.5)
        return _fill(r - 0.42, 0.04)
    if kind == "rows":  # crop rows
        a = _uniform(n, 0, math.pi, g)[:, None, None]
        return (torch.sin((xx * torch.cos(a) + yy * torch.sin(a)) * 18) > 0).float()
    if kind == "houses":  # small roofs on a lattice
        f = 5.0
        u, v = torch.remainder(xx * f / 2, 1) - 0.5, torch.remainder(yy * f / 2, 1) - 0.5
        return _fill(torch.maximum(u.abs(), v.abs()) - 0.22, 0.05)
    if kind == "blocks":  # large industrial roofs
        u, v = torch.remainder(xx * 1.2, 1) - 0.5, torch.remainder(yy * 1.2, 1) - 0.5
        return _fill(torch.maximum(u.abs(), v.abs()) - 0.35, 0.04)
    if kind == "ring":  # roundabout / stadium
        r = torch.hypot(xx - _uniform(n, -0.2, 0.2, g)[:, None, None], yy)
        return _fill((r - 0.5).abs() - 0.1, 0.04)
    if kind == "runway":  # one long wide strip with centre marks
        strip = _fill(yy.abs() - 0.2, 0.03)
        return strip
    if kind == "blob":  # lake
        return (_smooth_noise(n, xx.shape[-1], 3, g)[:, 0] > 0.45).float()
    if kind == "speckle":  # tree crowns
        return (_smooth_noise(n, xx.shape[-1], 12, g)[:, 0] > 0.5).float()
    raise ValueError(kind)


# (ground colour, structure, structure colour): remote-sensing-like classes
_AERIAL = [
    ((0.3, 0.5, 0.2), "circles", (0.5, 0.7, 0.2)),
    ((0.55, 0.5, 0.35), "grid", (0.3, 0.3, 0.3)),
    ((0.3, 0.5, 0.2), "road", (0.35, 0.35, 0.35)),
    ((0.3, 0.5, 0.2), "river", (0.15, 0.3, 0.55)),
    ((0.45, 0.45, 0.4), "runway", (0.7, 0.7, 0.7)),
    ((0.45, 0.45, 0.45), "houses", (0.7, 0.3, 0.25)),
    ((0.4, 0.4, 0.4), "blocks", (0.75, 0.75, 0.8)),
    ((0.3, 0.5, 0.2), "ring", (0.6, 0.3, 0.2)),
    ((0.85, 0.78, 0.55), "blob", (0.15, 0.35, 0.6)),
    ((0.2, 0.35, 0.15), "speckle", (0.05, 0.2, 0.05)),
    ((0.55, 0.45, 0.3), "rows", (0.35, 0.5, 0.2)),
    ((0.85, 0.78, 0.55), "road", (0.35, 0.35, 0.35)),
    ((0.45, 0.45, 0.45), "grid", (0.15, 0.15, 0.15)),
    ((0.15, 0.3, 0.55), "houses", (0.9, 0.9, 0.9)),
    ((0.3, 0.5, 0.2), "blocks", (0.6, 0.6, 0.6)),
    ((0.85, 0.78, 0.55), "circles", (0.3, 0.5, 0.2)),
]
_LANDUSE = [
    ((0.1, 0.3, 0.1), "speckle", (0.05, 0.2, 0.05)),  # forest
    ((0.6, 0.55, 0.3), "rows", (0.4, 0.55, 0.2)),  # annual crop
    ((0.45, 0.6, 0.3), "blob", (0.5, 0.65, 0.35)),  # pasture
    ((0.5, 0.5, 0.45), "houses", (0.6, 0.35, 0.3)),  # residential
    ((0.45, 0.45, 0.45), "blocks", (0.7, 0.7, 0.72)),  # industrial
    ((0.35, 0.5, 0.25), "road", (0.45, 0.45, 0.45)),  # highway
    ((0.35, 0.5, 0.25), "river", (0.1, 0.2, 0.45)),  # river
    ((0.05, 0.15, 0.4), "blob", (0.1, 0.25, 0.5)),  # sea / lake
    ((0.4, 0.5, 0.25), "speckle", (0.55, 0.55, 0.3)),  # herbaceous vegetation
    ((0.5, 0.45, 0.3), "houses", (0.2, 0.45, 0.15)),  # permanent crop (orchards)
]


def _render_overhead(table, labels, size, g, jitter: float):
    n = labels.shape[0]
    xx, yy = _coords(n, size)
    px, py = _local(
        xx, yy, _uniform(n, -0.5, 0.5, g), _uniform(n, -0.5, 0.5, g), _uniform(n, 0.8, 1.2, g),
        _uniform(n, 0, 2 * math.pi, g),
    )
    canvas = torch.zeros(n, 3, size, size)
    for cls, (ground, structure, color) in enumerate(table):
        idx = (labels == cls).nonzero().flatten()
        if not len(idx):
            continue
        m = len(idx)
        base = torch.tensor(ground) + jitter * torch.randn(m, 3, generator=g)
        tex = 0.12 * (_smooth_noise(m, size, 10, g) - 0.5)
        layer = _overhead_layer(structure, px[idx], py[idx], g)
        top = torch.tensor(color) + jitter * torch.randn(m, 3, generator=g)
        canvas[idx] = _paint(base[:, :, None, None] + tex, layer, top)
    return _finish(canvas, g, noise=0.05)


def render_aerial(labels, size, g):
    """RESISC45-like: structure from above (roads, fields, rivers, buildings)."""
    return _render_overhead(_AERIAL, labels, size, g, jitter=0.07)


def render_landuse(labels, size, g):
    """EuroSAT-like: land-cover classes, mostly texture and colour."""
    return _render_overhead(_LANDUSE, labels, size, g, jitter=0.08)


# --------------------------------------------------------------------------- vehicles

VEHICLE_CLASSES = 16


def render_vehicles(labels, size, g):
    """Stanford-Cars-like: fine-grained side silhouettes; colour is a nuisance.

    Class = body length x body height x cabin front/rear x wheel size (2 x 2 x 2 x 2).
    Vehicles always face right: a mirror would make a front and a rear cabin the same picture.
    """
    n = labels.shape[0]
    xx, yy = _coords(n, size)
    length = torch.where(labels % 2 == 0, 0.5, 0.9)
    height = torch.where((labels // 2) % 2 == 0, 0.22, 0.6)
    cabin_pos = torch.where((labels // 4) % 2 == 0, -0.6, 0.6)
    wheel = torch.where(labels // 8 == 0, 0.1, 0.26)
    px, py = _local(
        xx, yy, _uniform(n, -0.1, 0.1, g), _uniform(n, 0.0, 0.2, g), _uniform(n, 0.92, 1.02, g),
        _uniform(n, -0.05, 0.05, g),
    )
    L, H, C = (t[:, None, None] for t in (length, height, cabin_pos))
    body = torch.maximum(px.abs() - L, (py - 0.1).abs() - H / 2)
    cx = C * L
    cabin_top = py - 0.1 + H / 2 + 0.2
    cabin = torch.maximum((px - cx).abs() - 0.3, cabin_top.abs() - 0.2)
    wheels = torch.minimum(
        torch.hypot(px - L * 0.65, py - 0.1 - H / 2), torch.hypot(px + L * 0.65, py - 0.1 - H / 2)
    ) - wheel[:, None, None]
    canvas = _smooth_noise(n, size, 2, g, channels=3) * 0.35 + 0.4
    canvas = _paint(canvas, _fill(torch.minimum(body, cabin), 0.03), _random_colors(n, g, 0.0, 0.9))
    canvas = _paint(canvas, _fill(wheels, 0.03), torch.full((n, 3), 0.05))
    return _finish(canvas, g, noise=0.04)


# --------------------------------------------------------------------------- registry

SYNTH_FAMILIES: dict[str, SynthFamily] = {
    f.name: f
    for f in [
        SynthFamily("scenes", "SUN397", SCENE_CLASSES, render_scenes),
        SynthFamily("vehicles", "Stanford Cars", VEHICLE_CLASSES, render_vehicles),
        SynthFamily("aerial", "RESISC45", len(_AERIAL), render_aerial),
        SynthFamily("landuse", "EuroSAT", len(_LANDUSE), render_landuse),
        SynthFamily("house_numbers", "SVHN", 10, render_house_numbers),
        SynthFamily("signs", "GTSRB", SIGN_CLASSES, render_signs),
        SynthFamily("digits", "MNIST", 10, render_digits),
        SynthFamily("textures", "DTD", TEXTURE_CLASSES, render_textures),
    ]
}


def generate(family: str, count: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``count`` balanced, shuffled samples: (uint8 images [N,H,W,3], int64 labels [N])."""
    spec = SYNTH_FAMILIES[family]
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % spec.num_classes
    labels = labels[torch.randperm(count, generator=g)]
    chunks = []
    for start in range(0, count, 1024):  # bounded memory for the distance fields
        chunks.append(spec.render(labels[start : start + 1024], size, g))
    images = torch.cat(chunks) if chunks else torch.zeros(0, 3, size, size)
    pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return pixels, labels
