"""Generated compositional scenes: coloured shapes at positions, in counts,
with captions from a small grammar.

Two-object scenes come in Winoground-style pairs: the partner's caption uses
the same words in another order ("a red circle left of a blue square" /
"a blue circle left of a red square", or the two noun phrases swapped), and
the partner's image is what that caption describes. So the pair is a genuine
confounder: only word order tells the captions apart.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFilter

COLOURS = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (35, 75, 215),
    "yellow": (240, 205, 30),
    "purple": (135, 55, 180),
    "orange": (245, 135, 25),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "diamond")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds"}
NUMBERS = {2: "two", 3: "three", 4: "four"}
#: relation -> (dx, dy) sign of the first object relative to the second
RELATIONS = {"left of": (-1, 0), "right of": (1, 0), "above": (0, -1), "below": (0, 1)}
CANVAS = 96

#: ``{a}`` / ``{b}``: a noun phrase with its article; ``{pa}`` / ``{pb}``: without
ONE_TEMPLATES = ("{a}", "a drawing of {a}", "one {pa} on a plain background", "a picture of a single {pa}", "{pa}")
PAIR_TEMPLATES = ("{a} {rel} {b}", "a drawing of {a} {rel} {b}", "there is {a} {rel} {b}", "{pa} {rel} {pb}")
COUNT_TEMPLATES = ("{n} {c} {s}", "a drawing of {n} {c} {s}", "there are {n} {c} {s}")


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str

    def phrase(self) -> str:
        return f"{self.colour} {self.shape}"

    def with_article(self) -> str:
        return f"{'an' if self.colour[0] in 'aeiou' else 'a'} {self.phrase()}"


def _caption(template: str, a: Obj, b: Obj | None = None, rel: str = "") -> str:
    words = {"a": a.with_article(), "pa": a.phrase(), "rel": rel}
    if b is not None:
        words.update(b=b.with_article(), pb=b.phrase())
    return template.format(**words)


@dataclass(frozen=True)
class Scene:
    image: Image.Image
    caption: str
    kind: str
    #: what the caption says, without its template: two scenes with the same
    #: concept fit each other's captions
    concept: str


def _background(rng: random.Random) -> Image.Image:
    base = rng.randint(200, 250)
    tint = [min(255, max(0, base + rng.randint(-12, 12))) for _ in range(3)]
    im = Image.new("RGB", (CANVAS, CANVAS), tuple(tint))
    d = ImageDraw.Draw(im)
    for _ in range(rng.randint(0, 40)):  # faint speckles so backgrounds are not flat
        x, y = rng.randrange(CANVAS), rng.randrange(CANVAS)
        g = base + rng.randint(-25, 5)
        d.point((x, y), fill=(g, g, g))
    return im


def _draw(d: ImageDraw.ImageDraw, obj: Obj, cx: float, cy: float, r: float, rng: random.Random) -> None:
    colour = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in COLOURS[obj.colour])
    if obj.shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif obj.shape == "square":
        d.rectangle((cx - r * 0.9, cy - r * 0.9, cx + r * 0.9, cy + r * 0.9), fill=colour)
    elif obj.shape == "triangle":
        d.polygon(((cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)), fill=colour)
    else:  # diamond
        d.polygon(((cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)), fill=colour)


def _finish(im: Image.Image, rng: random.Random) -> Image.Image:
    return im.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.8)))


def _objects(rng: random.Random, n: int, distinct_colours: bool = True) -> list[Obj]:
    colours = rng.sample(list(COLOURS), n) if distinct_colours else [rng.choice(list(COLOURS)) for _ in range(n)]
    return [Obj(c, rng.choice(SHAPES)) for c in colours]


def one_object(rng: random.Random) -> Scene:
    (obj,) = _objects(rng, 1)
    im = _background(rng)
    r = rng.uniform(14, 26)
    _draw(ImageDraw.Draw(im), obj, rng.uniform(r + 4, CANVAS - r - 4), rng.uniform(r + 4, CANVAS - r - 4), r, rng)
    return Scene(_finish(im, rng), _caption(rng.choice(ONE_TEMPLATES), obj), "one", obj.phrase())


def counted(rng: random.Random) -> Scene:
    n = rng.choice(list(NUMBERS))
    (obj,) = _objects(rng, 1)
    im = _background(rng)
    d = ImageDraw.Draw(im)
    r = rng.uniform(9, 13)
    centres: list[tuple[float, float]] = []
    while len(centres) < n:  # rejection sampling: objects must not touch
        c = (rng.uniform(r + 3, CANVAS - r - 3), rng.uniform(r + 3, CANVAS - r - 3))
        if all((c[0] - x) ** 2 + (c[1] - y) ** 2 > (2.4 * r) ** 2 for x, y in centres):
            centres.append(c)
    for cx, cy in centres:
        _draw(d, obj, cx, cy, r, rng)
    words = {"n": NUMBERS[n], "c": obj.colour, "s": PLURAL[obj.shape]}
    return Scene(
        _finish(im, rng), rng.choice(COUNT_TEMPLATES).format(**words), "count", COUNT_TEMPLATES[0].format(**words)
    )


def _pair_image(a: Obj, b: Obj, rel: str, layout: tuple[float, ...], rng: random.Random) -> Image.Image:
    """``a`` placed ``rel`` ``b``; ``layout`` fixes sizes and offsets so a
    partner scene differs only in what the caption's word order says."""
    r, along, across_a, across_b = layout
    dx, dy = RELATIONS[rel]
    mid = CANVAS / 2
    # along the relation's axis: a on the side the relation names, b opposite
    pa = (mid + dx * along, across_a) if dx else (across_a, mid + dy * along)
    pb = (mid - dx * along, across_b) if dx else (across_b, mid - dy * along)
    im = _background(rng)
    d = ImageDraw.Draw(im)
    _draw(d, a, *pa, r, rng)
    _draw(d, b, *pb, r, rng)
    return _finish(im, rng)


def _concept(a: Obj, b: Obj, rel: str) -> str:
    return f"{a.phrase()} {rel} {b.phrase()}"


def confounder_pair(rng: random.Random) -> tuple[Scene, Scene]:
    """A two-object scene and its word-order partner (same words, another
    order, another image)."""
    a, b = _objects(rng, 2)
    rel = rng.choice(list(RELATIONS))
    r = rng.uniform(11, 16)
    layout = (
        r,
        rng.uniform(r + 6, CANVAS / 2 - r - 3),
        rng.uniform(r + 4, CANVAS - r - 4),
        rng.uniform(r + 4, CANVAS - r - 4),
    )
    template = rng.choice(PAIR_TEMPLATES)
    if a.shape != b.shape and rng.random() < 0.5:  # swap the colours between the shapes
        a2, b2 = Obj(b.colour, a.shape), Obj(a.colour, b.shape)
    else:  # swap the two noun phrases
        a2, b2 = b, a
    first = Scene(_pair_image(a, b, rel, layout, rng), _caption(template, a, b, rel), "pair", _concept(a, b, rel))
    second = Scene(
        _pair_image(a2, b2, rel, layout, rng), _caption(template, a2, b2, rel), "pair", _concept(a2, b2, rel)
    )
    return first, second
