"""The bundled tiny CLIP world: procedural images of coloured, textured shapes.

Every image is one object (colour, shape, texture, size, position, rotation) on a
background (dark, light, gradient or cluttered), rendered in torch from a seeded
generator, so a dataset split is a pure function of (dataset, split, seed) and
nothing is stored on disk.  The same renderer makes the captions the tiny CLIP
is pretrained on, the three small classification datasets and the OOD pool.

Class sets are disjoint from the OOD pool by construction: OOD images use only
colours and shapes that no dataset class names (see ``OOD_COLOURS`` and
``OOD_SHAPES``), so an OOD image never shows any dataset's class.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import attrs
import torch

COLOURS: Mapping[str, tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.12),
    "green": (0.12, 0.68, 0.18),
    "blue": (0.12, 0.28, 0.92),
    "yellow": (0.95, 0.88, 0.10),
    "purple": (0.58, 0.18, 0.76),
    "orange": (0.98, 0.52, 0.06),
    "cyan": (0.08, 0.84, 0.88),
    "pink": (0.98, 0.55, 0.76),
    "white": (0.97, 0.97, 0.97),
    "brown": (0.50, 0.30, 0.10),
    "grey": (0.52, 0.52, 0.52),
}
SHAPES: Sequence[str] = (
    "circle", "square", "triangle", "diamond", "cross", "ring", "star", "hexagon",
    "crescent", "semicircle", "heart",
)
TEXTURES: Sequence[str] = ("plain", "striped", "dotted", "checkered")
TEXTURE_NOUNS: Mapping[str, str] = {"striped": "stripes", "dotted": "dots", "checkered": "checks"}
BACKGROUNDS: Sequence[str] = ("dark", "light", "gradient", "cluttered")
SIZES: Sequence[str] = ("small", "large")

OOD_COLOURS = ("white", "brown", "grey")
OOD_SHAPES = ("crescent", "semicircle", "heart")
_DATASET_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "pink")
_DATASET_SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "star", "hexagon")
_PATTERNED = ("striped", "dotted", "checkered")

_ATTRS = ("colour", "shape", "texture", "background", "size")
_VOCAB = {
    "colour": tuple(COLOURS),
    "shape": tuple(SHAPES),
    "texture": tuple(TEXTURES),
    "background": tuple(BACKGROUNDS),
    "size": tuple(SIZES),
}


@attrs.frozen(kw_only=True)
class TinyDatasetSpec:
    """A class set over the world: each class fixes some attributes; the rest are drawn from ``free``."""

    name: str
    description: str
    classes: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]
    free: tuple[tuple[str, tuple[str, ...]], ...]

    @property
    def classnames(self) -> list[str]:
        return [name for name, _ in self.classes]


def _product_spec(name, description, first, second, naming, free) -> TinyDatasetSpec:
    (attr_a, values_a), (attr_b, values_b) = first, second
    classes = tuple(
        (naming(a, b), ((attr_a, a), (attr_b, b))) for a in values_a for b in values_b
    )
    return TinyDatasetSpec(name=name, description=description, classes=classes, free=tuple(free.items()))


DATASETS: Mapping[str, TinyDatasetSpec] = {
    spec.name: spec
    for spec in (
        _product_spec(
            "tiny-colorshapes", "6 colours x 6 shapes: 'red circle'",
            ("colour", _DATASET_COLOURS[:6]), ("shape", _DATASET_SHAPES[:6]),
            lambda c, s: f"{c} {s}",
            {"texture": tuple(TEXTURES), "background": tuple(BACKGROUNDS), "size": tuple(SIZES)},
        ),
        _product_spec(
            "tiny-patterns", "3 textures x 8 shapes: 'striped square'",
            ("texture", _PATTERNED), ("shape", _DATASET_SHAPES),
            lambda t, s: f"{t} {s}",
            {"colour": _DATASET_COLOURS, "background": tuple(BACKGROUNDS), "size": tuple(SIZES)},
        ),
        _product_spec(
            "tiny-palette", "8 colours x 3 textures: 'red stripes'",
            ("colour", _DATASET_COLOURS), ("texture", _PATTERNED),
            lambda c, t: f"{c} {TEXTURE_NOUNS[t]}",
            {"shape": _DATASET_SHAPES, "background": tuple(BACKGROUNDS), "size": tuple(SIZES)},
        ),
    )
}

OOD_SPEC = TinyDatasetSpec(
    name="tiny-ood",
    description="objects whose colour and shape no dataset class names",
    classes=(("ood object", ()),),
    free=(
        ("colour", OOD_COLOURS), ("shape", OOD_SHAPES), ("texture", tuple(TEXTURES)),
        ("background", tuple(BACKGROUNDS)), ("size", tuple(SIZES)),
    ),
)


def _choice(values: Sequence[str], n: int, generator: torch.Generator) -> torch.Tensor:
    """Indices into the world vocabulary of ``n`` draws from ``values``."""
    return torch.randint(len(values), (n,), generator=generator)


def sample_attributes(spec: TinyDatasetSpec, labels: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Per-image vocabulary indices for every attribute, honouring each label's fixed attributes."""
    n = labels.numel()
    out: dict[str, torch.Tensor] = {}
    free = dict(spec.free)
    for attr in _ATTRS:
        vocab = _VOCAB[attr]
        if attr in free:
            pool = torch.tensor([vocab.index(v) for v in free[attr]])
            out[attr] = pool[_choice(free[attr], n, generator)]
        else:
            fixed = torch.tensor([vocab.index(dict(fixed)[attr]) for _, fixed in spec.classes])
            out[attr] = fixed[labels]
    return out


def _shape_masks(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(n_shapes, B, H, W) boolean masks in object coordinates (radius about 1)."""
    r = torch.sqrt(u * u + v * v)
    theta = torch.atan2(v, u)
    au, av = u.abs(), v.abs()
    heart_x, heart_y = u * 1.15, -(v * 1.15) + 0.25
    masks = {
        "circle": r < 0.95,
        "square": torch.maximum(au, av) < 0.78,
        "triangle": (v < 0.7) & (au < (v + 0.95) * 0.58),
        "diamond": au + av < 1.0,
        "cross": ((au < 0.3) & (av < 0.95)) | ((av < 0.3) & (au < 0.95)),
        "ring": (r < 0.95) & (r > 0.55),
        "star": r < 0.5 + 0.42 * torch.cos(5 * (theta + math.pi / 2)).clamp(min=0) ** 2,
        "hexagon": torch.maximum(au * 0.866 + av * 0.5, av) < 0.82,
        "crescent": (r < 0.95) & ((u - 0.45) ** 2 + v**2 > 0.75**2),
        "semicircle": (r < 0.95) & (v > -0.1),
        "heart": (heart_x**2 + heart_y**2 - 0.7) ** 3 - heart_x**2 * heart_y**3 < 0,
    }
    return torch.stack([masks[name] for name in SHAPES])


def _texture(kind: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B, H, W) darkening pattern in [0, 1] for each image's texture index."""
    n = kind.numel()
    period = 5.0 + 3.0 * torch.rand(n, 1, 1, generator=generator)
    angle = math.pi * torch.rand(n, 1, 1, generator=generator)
    along = (xs * torch.cos(angle) + ys * torch.sin(angle)) / period
    across = (-xs * torch.sin(angle) + ys * torch.cos(angle)) / period
    stripes = (torch.frac(along + 10.0) < 0.5).float()
    dots = ((torch.frac(along + 10.0) - 0.5) ** 2 + (torch.frac(across + 10.0) - 0.5) ** 2 < 0.1).float()
    checks = ((torch.floor(along) + torch.floor(across)) % 2 == 0).float()
    plain = torch.zeros_like(stripes)
    patterns = torch.stack([plain, stripes, dots, checks])  # order of TEXTURES
    return patterns[kind, torch.arange(n)]


def _background(kind: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    n = kind.numel()
    tint = 0.04 * (torch.rand(n, 3, 1, 1, generator=generator) - 0.5)
    dark = 0.03 + 0.17 * torch.rand(n, 1, 1, 1, generator=generator) + tint
    light = 0.75 + 0.2 * torch.rand(n, 1, 1, 1, generator=generator) + tint
    ramp = torch.linspace(0, 1, size)
    angle = 2 * math.pi * torch.rand(n, 1, 1, generator=generator)
    t = (ramp.view(1, 1, -1) * torch.cos(angle) + ramp.view(1, -1, 1) * torch.sin(angle))
    t = (t - t.amin(dim=(1, 2), keepdim=True)) / (t.amax(dim=(1, 2), keepdim=True) - t.amin(dim=(1, 2), keepdim=True))
    # Backgrounds are achromatic (with a faint tint) so that a colour word names the object only.
    c0, c1 = torch.rand(n, 1, 1, 1, generator=generator), torch.rand(n, 1, 1, 1, generator=generator)
    gradient = (c0 + (c1 - c0) * t.unsqueeze(1)) * 0.8 + 0.1 + tint
    coarse = 0.3 + 0.4 * torch.rand(n, 1, 4, 4, generator=generator)
    cluttered = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False) + tint
    options = torch.stack([
        dark.expand(n, 3, size, size), light.expand(n, 3, size, size), gradient, cluttered,
    ])
    return options[kind, torch.arange(n)]


def render(attributes: Mapping[str, torch.Tensor], size: int, generator: torch.Generator) -> torch.Tensor:
    """Render a batch of scenes to float images in [0, 1] of shape (B, 3, size, size)."""
    n = attributes["colour"].numel()
    image = _background(attributes["background"], size, generator)
    coords = torch.linspace(-1, 1, size)
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")
    radius = torch.where(
        attributes["size"] == 0,
        0.42 + 0.06 * torch.rand(n, generator=generator),
        0.62 + 0.08 * torch.rand(n, generator=generator),
    ).view(n, 1, 1)
    centre = (torch.rand(n, 2, 1, 1, generator=generator) - 0.5) * 2 * (0.92 - radius.unsqueeze(1))
    rot = (torch.rand(n, 1, 1, generator=generator) - 0.5) * 0.7
    dx, dy = gx - centre[:, 0], gy - centre[:, 1]
    u = (dx * torch.cos(rot) + dy * torch.sin(rot)) / radius
    v = (-dx * torch.sin(rot) + dy * torch.cos(rot)) / radius
    mask = _shape_masks(u, v)[attributes["shape"], torch.arange(n)].unsqueeze(1).float()
    palette = torch.tensor(list(COLOURS.values()))
    rgb = palette[attributes["colour"]] + 0.08 * (torch.rand(n, 3, generator=generator) - 0.5)
    pixels = torch.arange(size, dtype=torch.float32)
    py, px = torch.meshgrid(pixels, pixels, indexing="ij")
    strength = 0.4 + 0.2 * torch.rand(n, 1, 1, generator=generator)
    pattern = _texture(attributes["texture"], px, py, generator) * strength
    obj = rgb.view(n, 3, 1, 1) * (1 - pattern.unsqueeze(1))
    image = image * (1 - mask) + obj * mask
    # Only quantisation-level noise: training on visible pixel noise would teach the tiny CLIP to
    # ignore exactly the small perturbations a backdoor trigger is made of (real CLIP is fragile).
    image = image + 0.004 * torch.randn(image.shape, generator=generator)
    return image.clamp(0, 1)


def _words(attributes: Mapping[str, torch.Tensor], i: int) -> dict[str, str]:
    return {attr: _VOCAB[attr][int(attributes[attr][i])] for attr in _ATTRS}


def caption(attributes: Mapping[str, torch.Tensor], i: int, generator: torch.Generator) -> tuple[str, tuple[str, ...]]:
    """One of several caption templates for image ``i``, and the attributes it names.

    Most captions name colour and shape (what the datasets' class names combine); the
    others name texture, size or background too, so every attribute is grounded in text.
    """
    w = _words(attributes, i)
    colour, shape, texture, bg, size = w["colour"], w["shape"], w["texture"], w["background"], w["size"]
    tex_adj = "plain " if texture == "plain" else f"{texture} "
    templates = [
        (f"a photo of a {colour} {shape}.", ("colour", "shape")),
        (f"a photo of a {colour} {shape}.", ("colour", "shape")),
        (f"a photo of a {size} {colour} {shape}.", ("size", "colour", "shape")),
        (f"a {colour} {tex_adj}{shape} on a {bg} background.", ("colour", "texture", "shape", "background")),
        (f"a photo of a {tex_adj}{shape}.", ("texture", "shape")),
        (f"a photo of a {tex_adj}{colour} {shape}.", ("texture", "colour", "shape")),
    ]
    if texture in TEXTURE_NOUNS:
        noun = TEXTURE_NOUNS[texture]
        templates += [(f"a photo of a {colour} {noun}.", ("colour", "texture")),
                      (f"a {shape} with {colour} {noun}.", ("shape", "colour", "texture"))]
    k = int(torch.randint(len(templates), (1,), generator=generator))
    return templates[k]


def pretraining_batch(n: int, size: int, generator: torch.Generator, focus: float = 0.5) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Images and captions over every colour, shape, texture and background of the world.

    A ``focus`` share of batches show a single colour (hard negatives).  Also returns ``matches`` (n, n): caption j truly describes image i when image i has
    every attribute caption j names, so contrastive training can treat all true captions as
    positives instead of pushing apart, say, two red circles whose captions differ in texture.
    """
    attributes = {attr: _choice(_VOCAB[attr], n, generator) for attr in _ATTRS}
    if torch.rand((), generator=generator) < focus:
        # Hard negatives: the whole batch has one colour, so only shape, texture, size and
        # background tell its captions apart.  Without such batches colour (learnt at once)
        # explains most of the contrastive loss and the text tower stalls on shape words.
        attributes["colour"] = torch.full((n,), int(torch.randint(len(COLOURS), (1,), generator=generator)))
    images = render(attributes, size, generator)
    captions, named = zip(*(caption(attributes, i, generator) for i in range(n)))
    matches = torch.ones(n, n, dtype=torch.bool)
    for attr in _ATTRS:
        names_attr = torch.tensor([attr in nm for nm in named])
        same = attributes[attr].view(n, 1) == attributes[attr].view(1, n)
        matches &= same | ~names_attr.view(1, n)
    return images, list(captions), matches


_SPLIT_SALT = {"train": 1, "val": 2, "test": 3, "ood": 4}


def make_split(spec: TinyDatasetSpec, split: str, per_class: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` images of every class of ``spec``: (images (N,3,H,W) in [0,1], labels (N,))."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + _SPLIT_SALT[split] * 7919 + sum(map(ord, spec.name)))
    labels = torch.arange(len(spec.classes)).repeat_interleave(per_class)
    attributes = sample_attributes(spec, labels, generator)
    images = []
    for start in range(0, labels.numel(), 512):  # bounded memory for large splits
        chunk = {k: v[start:start + 512] for k, v in attributes.items()}
        images.append(render(chunk, size, generator))
    return torch.cat(images), labels


def ood_pool(n: int, size: int, seed: int) -> torch.Tensor:
    """``n`` OOD images (no dataset class appears in any of them)."""
    images, _ = make_split(OOD_SPEC, "ood", n, size, seed)
    return images
