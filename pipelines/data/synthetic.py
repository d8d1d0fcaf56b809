"""A generated mirror of PASCAL VOC2012 and SBD, in the real archive layouts.

The real archives (VOCtrainval_11-May-2012.tar, 2 GB; benchmark.tgz, 1.4 GB) are
not always reachable: CI machines, laptops without the data, tests. This module
writes small stand-ins with the same names, directory layouts and file formats,
so every later stage (fetch, preprocess, training, evaluation) runs unchanged on
them:

    VOCtrainval_11-May-2012.tar
        VOCdevkit/VOC2012/JPEGImages/<id>.jpg
        VOCdevkit/VOC2012/SegmentationClass/<id>.png   palette PNG, VOC colour map, 255 = void band
        VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val,trainval}.txt
    benchmark.tgz
        benchmark_RELEASE/dataset/img/<id>.jpg
        benchmark_RELEASE/dataset/cls/<id>.mat          GTcls: Segmentation, Boundaries, CategoriesPresent
        benchmark_RELEASE/dataset/inst/<id>.mat         GTinst: Segmentation, Boundaries, Categories
        benchmark_RELEASE/dataset/{train,val}.txt

Ids are real VOC ids: validation images are drawn from the seg11valid ids (pipelines.data.shards)
and training images get fresh SBD-style ids (YYYY_NNNNNN, 2008-2011) that never
collide with it, so the real split logic applies as is.

The pictures are synthetic but learnable: each of the 20 VOC classes is a distinct
shape with its own colour and texture (jittered per object), laid over a cluttered
background drawn only in low-saturation colours. Objects come in several sizes,
overlap, and include thin parts (spokes, legs, stems, frames), so a small FCN
learns them within minutes on a CPU and finer outputs (FCN-8s) pay off at the
boundaries.

The same parameters give byte-identical archives: every image is drawn from a
numpy Generator seeded with (seed, id), and tar/gzip/PNG/JPEG/MAT encoding is
pinned (sorted members, fixed mtime and owners, gzip without name or time, fixed
MAT header text).

    fcn demo-data --out data/mirror --train 300 --val 100 --max-side 160
"""
from __future__ import annotations

import contextlib
import gzip
import io
import math
import multiprocessing
import os
import tarfile
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import numpy as np
import scipy.io
import scipy.ndimage
import scipy.sparse
from PIL import Image, ImageDraw

from fcn_models.palette import voc_colormap
from fcn_models.voc import NUM_CLASSES, VOID
from pipelines.core.errors import UsageError
from pipelines.core.files import file_md5
from pipelines.data.shards import seg11valid_ids

VOC_ARCHIVE = "VOCtrainval_11-May-2012.tar"
SBD_ARCHIVE = "benchmark.tgz"
VOC_ROOT = "VOCdevkit/VOC2012"
SBD_ROOT = "benchmark_RELEASE/dataset"
JPEG_QUALITY = 90
# 2012-05-11 00:00 UTC, the VOC2012 release date: a fixed mtime for every member.
ARCHIVE_MTIME = 1336694400
# savemat writes the creation time into the 116-byte MAT header text; pin it.
MAT_HEADER = b"MATLAB 5.0 MAT-file, Platform: posix, written by pipelines.demo_data".ljust(116, b" ")
# SBD-style training ids: four years, numbers below 9000, as in the real release.
TRAIN_YEARS = (2008, 2009, 2010, 2011)
TRAIN_ID_NUMBERS = 9000


# --------------------------------------------------------------------------- ids

def plan_mirror(n_train: int, n_val: int, seed: int) -> dict[str, list[str]]:
    """Which ids go in which list of which archive.

    train: fresh SBD-style ids (SBD train.txt); val: a seeded choice of seg11valid
    ids. As in the real data, VOC's train list holds some SBD training ids, VOC's
    val list holds the chosen seg11valid ids plus some SBD training ids (the ones
    seg11valid leaves out), and SBD's val list holds some of the seg11valid ids.
    """
    valid = seg11valid_ids()
    if not 1 <= n_val <= len(valid):
        raise UsageError(f"n_val = {n_val}: must be between 1 and {len(valid)} (the seg11valid ids available)")
    max_train = len(TRAIN_YEARS) * TRAIN_ID_NUMBERS // 2
    if not 1 <= n_train <= max_train:
        raise UsageError(f"n_train = {n_train}: must be between 1 and {max_train}")
    rng = np.random.default_rng([seed, 0])
    val = sorted(valid[i] for i in rng.choice(len(valid), size=n_val, replace=False))
    taken, train = set(valid), set()
    while len(train) < n_train:
        year = TRAIN_YEARS[int(rng.integers(len(TRAIN_YEARS)))]
        image_id = f"{year}_{int(rng.integers(1, TRAIN_ID_NUMBERS)):06d}"
        if image_id not in taken:
            train.add(image_id)
    train = sorted(train)
    voc_train = train[::5]
    voc_val = sorted(val + train[2::10])
    return {
        "train": train,
        "val": val,
        "voc_train": voc_train,
        "voc_val": voc_val,
        "voc_trainval": sorted(voc_train + voc_val),
        "sbd_train": train,
        "sbd_val": val[::2],
    }


# Objects per image, fewest and most, unless asked otherwise.
OBJECTS = (3, 6)


def plan_classes(ids: list[str], seed: int, salt: int, objects: tuple[int, int] = OBJECTS) -> dict[str, list[int]]:
    """Object classes for each image, dealt from shuffled rounds of 1..20.

    Dealing from rounds (not drawing independently) puts every class in any split
    with at least 20 objects, and keeps class counts balanced. objects: the fewest
    and most objects an image gets.
    """
    rng = np.random.default_rng([seed, salt])
    counts = rng.integers(objects[0], objects[1] + 1, size=len(ids))
    rounds = math.ceil(int(counts.sum()) / 20)
    deck = np.concatenate([rng.permutation(20) + 1 for _ in range(rounds)])
    plan, start = {}, 0
    for image_id, count in zip(ids, counts):
        plan[image_id] = [int(c) for c in deck[start:start + count]]
        start += count
    return plan


def image_rng(seed: int, image_id: str) -> np.random.Generator:
    """The generator for one image: depends on (seed, id) only, not on order."""
    year, number = image_id.split("_")
    return np.random.default_rng([seed, int(year), int(number)])


# ----------------------------------------------------------------------- drawing

class Pen:
    """Draws one object's mask from shapes given in object units.

    Unit coordinates span about [-1, 1] on the object's longer side (y down); the
    pen scales them by s pixels, mirrors, rotates and moves them into place.
    """

    def __init__(self, draw: ImageDraw.ImageDraw, cx: float, cy: float, s: float, angle: float, flip: bool):
        self.draw, self.cx, self.cy, self.s = draw, cx, cy, s
        self.cos, self.sin, self.flip = math.cos(angle), math.sin(angle), -1.0 if flip else 1.0

    def _xy(self, points):
        out = []
        for x, y in points:
            x *= self.flip
            out.append((self.cx + self.s * (x * self.cos - y * self.sin),
                        self.cy + self.s * (x * self.sin + y * self.cos)))
        return out

    def _width(self, width: float) -> int:
        return max(1, round(width * self.s))

    def poly(self, points, erase: bool = False):
        self.draw.polygon(self._xy(points), fill=0 if erase else 255)

    def rect(self, x0, y0, x1, y1, erase: bool = False):
        self.poly([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], erase)

    def ellipse(self, cx, cy, rx, ry):
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        self.poly(list(zip(cx + rx * np.cos(t), cy + ry * np.sin(t))))

    def line(self, points, width: float):
        self.draw.line(self._xy(points), fill=255, width=self._width(width), joint="curve")

    def ring(self, cx, cy, r, width: float):
        t = np.linspace(0, 2 * np.pi, 41)
        self.line(list(zip(cx + r * np.cos(t), cy + r * np.sin(t))), width)


# One function per class. Thin parts (width ~0.03-0.08 of the object's size) are
# where coarse outputs fail, so several classes have them.

def _aeroplane(pen, rng):
    pen.ellipse(0, 0, 1.0, 0.13)
    sweep = rng.uniform(0.1, 0.35)
    pen.poly([(-0.1, -0.08), (0.3, -0.08), (0.05 - sweep, -0.9), (-0.2 - sweep, -0.9)])
    pen.poly([(-0.1, 0.08), (0.3, 0.08), (0.05 - sweep, 0.9), (-0.2 - sweep, 0.9)])
    pen.poly([(-1.0, -0.05), (-0.72, -0.05), (-0.88, -0.42), (-1.0, -0.42)])


def _bicycle(pen, rng):
    for cx in (-0.55, 0.55):
        pen.ring(cx, 0.35, 0.42, 0.05)
        for a in np.linspace(0, np.pi, int(rng.integers(3, 6)), endpoint=False) + rng.uniform(0, np.pi):
            dx, dy = 0.42 * math.cos(a), 0.42 * math.sin(a)
            pen.line([(cx - dx, 0.35 - dy), (cx + dx, 0.35 + dy)], 0.025)
    pen.line([(-0.55, 0.35), (-0.1, -0.2), (0.4, -0.2), (0.55, 0.35)], 0.05)
    pen.line([(-0.1, -0.2), (0.0, 0.35), (-0.55, 0.35)], 0.05)
    pen.line([(-0.15, -0.35), (-0.05, -0.35)], 0.06)
    pen.line([(0.4, -0.2), (0.35, -0.45), (0.5, -0.5)], 0.05)


def _bird(pen, rng):
    lift = rng.uniform(-0.2, 0.3)
    pen.poly([(-1.0, -0.5 - lift), (0.0, 0.15), (1.0, -0.5 - lift), (1.0, -0.15 - lift),
              (0.0, 0.5), (-1.0, -0.15 - lift)])
    pen.ellipse(0.0, 0.3, 0.2, 0.18)


def _boat(pen, rng):
    pen.poly([(-1.0, 0.35), (1.0, 0.35), (0.75, 0.7), (-0.75, 0.7)])
    pen.line([(0.0, 0.35), (0.0, -0.95)], 0.04)
    pen.poly([(0.06, -0.9), (0.06, 0.25), (rng.uniform(0.5, 0.85), 0.25)])


def _bottle(pen, rng):
    pen.rect(-0.32, -0.25, 0.32, 1.0)
    pen.poly([(-0.32, -0.25), (0.32, -0.25), (0.12, -0.55), (-0.12, -0.55)])
    pen.rect(-0.12, -1.0, 0.12, -0.55)


def _bus(pen, rng):
    pen.poly([(-1.0, -0.45), (-0.9, -0.55), (1.0, -0.55), (1.0, 0.55), (-1.0, 0.55)])


def _car(pen, rng):
    pen.rect(-1.0, -0.05, 1.0, 0.4)
    pen.poly([(-0.55, -0.05), (-0.3, -0.45), (0.35, -0.45), (0.6, -0.05)])
    pen.ellipse(-0.6, 0.42, 0.2, 0.2)
    pen.ellipse(0.6, 0.42, 0.2, 0.2)


def _cat(pen, rng):
    pen.ellipse(0.15, 0.3, 0.65, 0.38)
    pen.ellipse(-0.6, -0.2, 0.3, 0.28)
    pen.poly([(-0.86, -0.3), (-0.8, -0.68), (-0.62, -0.42)])
    pen.poly([(-0.56, -0.42), (-0.4, -0.68), (-0.36, -0.3)])
    pen.line([(0.75, 0.35), (0.95, rng.uniform(-0.6, 0.0))], 0.07)


def _chair(pen, rng):
    pen.line([(0.35, -1.0), (0.35, 0.1)], 0.12)
    pen.line([(-0.45, 0.1), (0.4, 0.1)], 0.12)
    pen.line([(-0.4, 0.1), (-0.45, 1.0)], 0.06)
    pen.line([(0.35, 0.1), (0.4, 1.0)], 0.06)


def _cow(pen, rng):
    pen.ellipse(0.0, 0.0, 0.8, 0.42)
    pen.ellipse(-0.85, -0.25, 0.22, 0.17)
    for x in (-0.5, -0.28, 0.3, 0.55):
        pen.line([(x, 0.2), (x + rng.uniform(-0.05, 0.05), 0.85)], 0.11)
    pen.line([(0.78, -0.05), (0.92, 0.45)], 0.04)


def _diningtable(pen, rng):
    pen.rect(-1.0, -0.35, 1.0, -0.15)
    for x in (-0.85, 0.85):
        pen.line([(x, -0.2), (x, 0.6)], 0.08)


def _dog(pen, rng):
    pen.ellipse(0.0, 0.05, 0.6, 0.3)
    pen.ellipse(-0.65, -0.3, 0.25, 0.2)
    pen.ellipse(-0.88, -0.22, 0.14, 0.08)
    for x in (-0.4, -0.2, 0.25, 0.45):
        pen.line([(x, 0.2), (x, 0.75)], 0.1)
    pen.line([(0.55, -0.05), (0.9, rng.uniform(-0.6, -0.2))], 0.06)


def _horse(pen, rng):
    pen.ellipse(0.1, 0.0, 0.6, 0.28)
    pen.poly([(-0.4, -0.12), (-0.2, 0.05), (-0.55, -0.7), (-0.75, -0.6)])
    pen.ellipse(-0.8, -0.7, 0.2, 0.1)
    for x in (-0.3, -0.15, 0.4, 0.55):
        pen.line([(x, 0.15), (x + rng.uniform(-0.1, 0.1), 0.95)], 0.06)
    pen.line([(0.68, -0.05), (0.9, 0.5)], 0.05)


def _motorbike(pen, rng):
    pen.ellipse(-0.6, 0.4, 0.35, 0.35)
    pen.ellipse(0.6, 0.4, 0.35, 0.35)
    pen.poly([(-0.6, 0.4), (-0.2, -0.15), (0.4, -0.15), (0.6, 0.4), (0.2, 0.2)])
    pen.line([(0.35, -0.15), (0.5, -0.55)], 0.06)


def _person(pen, rng):
    pen.ellipse(0.0, -0.82, 0.15, 0.17)
    pen.poly([(-0.22, -0.6), (0.22, -0.6), (0.18, 0.1), (-0.18, 0.1)])
    for side in (-1, 1):
        pen.line([(0.2 * side, -0.55), (side * rng.uniform(0.3, 0.6), rng.uniform(-0.3, 0.1))], 0.08)
        pen.line([(0.1 * side, 0.1), (side * rng.uniform(0.12, 0.3), 1.0)], 0.1)


def _pottedplant(pen, rng):
    pen.poly([(-0.35, 0.45), (0.35, 0.45), (0.25, 1.0), (-0.25, 1.0)])
    for _ in range(int(rng.integers(4, 8))):
        a = rng.uniform(-2.6, -0.5)
        end = (0.75 * math.cos(a), 0.45 + 1.3 * math.sin(a))
        pen.line([(0.0, 0.45), end], 0.035)
        pen.ellipse(end[0], end[1], 0.12, 0.07)


def _sheep(pen, rng):
    for a in np.linspace(0, 2 * np.pi, 7, endpoint=False):
        pen.ellipse(0.5 * math.cos(a), 0.22 * math.sin(a), 0.32, 0.3)
    pen.ellipse(-0.9, -0.15, 0.16, 0.12)
    for x in (-0.35, 0.35):
        pen.line([(x, 0.3), (x, 0.75)], 0.06)


def _sofa(pen, rng):
    pen.poly([(-1.0, -0.5), (-0.75, -0.5), (-0.75, 0.1), (0.75, 0.1), (0.75, -0.5), (1.0, -0.5),
              (1.0, 0.6), (-1.0, 0.6)])


def _train(pen, rng):
    for x0, x1 in ((-1.0, -0.37), (-0.33, 0.31), (0.35, 1.0)):
        pen.rect(x0, -0.16, x1, 0.16)
    pen.line([(-0.4, 0.0), (0.4, 0.0)], 0.03)
    pen.rect(-0.9, -0.3, -0.8, -0.16)


def _tvmonitor(pen, rng):
    pen.rect(-1.0, -0.7, 1.0, 0.6)
    pen.rect(-0.86, -0.56, 0.86, 0.46, erase=True)
    pen.rect(-0.1, 0.6, 0.1, 0.8)
    pen.rect(-0.4, 0.8, 0.4, 0.9)


class ClassStyle(NamedTuple):
    shape: Callable      # draws the class's outline with a Pen
    colour: tuple        # RGB before per-object jitter
    texture: str         # one of _texture's kinds
    size: float          # size relative to the other classes
    max_turn: float      # largest rotation, degrees


# Colours sit on the {0, 128, 255} grid away from the grey axis; the background
# uses only near-grey colours, so colour alone nearly separates object from
# background, while texture, jitter and noise keep it from being a lookup.
CLASS_STYLES = {
    1: ClassStyle(_aeroplane, (0, 128, 255), "gradient", 1.0, 35),
    2: ClassStyle(_bicycle, (0, 255, 0), "flat", 0.9, 15),
    3: ClassStyle(_bird, (255, 255, 0), "dots", 0.45, 40),
    4: ClassStyle(_boat, (0, 0, 128), "stripes", 0.9, 10),
    5: ClassStyle(_bottle, (0, 128, 0), "gradient", 0.6, 10),
    6: ClassStyle(_bus, (255, 128, 0), "stripes", 1.2, 8),
    7: ClassStyle(_car, (255, 0, 0), "flat", 0.9, 8),
    8: ClassStyle(_cat, (128, 0, 128), "stripes", 0.7, 20),
    9: ClassStyle(_chair, (128, 128, 0), "grain", 0.7, 10),
    10: ClassStyle(_cow, (128, 0, 0), "dots", 1.0, 10),
    11: ClassStyle(_diningtable, (0, 128, 128), "grain", 1.0, 8),
    12: ClassStyle(_dog, (255, 0, 128), "grain", 0.75, 15),
    13: ClassStyle(_horse, (128, 0, 255), "gradient", 1.0, 12),
    14: ClassStyle(_motorbike, (0, 0, 255), "checker", 0.85, 15),
    15: ClassStyle(_person, (255, 128, 128), "flat", 0.8, 12),
    16: ClassStyle(_pottedplant, (128, 255, 0), "dots", 0.7, 10),
    17: ClassStyle(_sheep, (255, 0, 255), "grain", 0.75, 10),
    18: ClassStyle(_sofa, (0, 255, 128), "checker", 1.0, 8),
    19: ClassStyle(_train, (0, 255, 255), "stripes", 1.3, 15),
    20: ClassStyle(_tvmonitor, (128, 128, 255), "checker", 0.7, 8),
}

# Common VOC aspect ratios (short side / long side); 500x375 is the most frequent.
ASPECTS = (0.6, 0.667, 0.667, 0.75, 0.75, 0.75, 0.75, 0.8, 0.9, 1.0)


def _dull_colour(rng) -> tuple[int, int, int]:
    """A near-grey colour (chroma <= ~40), never close to a class colour."""
    grey = rng.uniform(25, 225)
    return tuple(int(np.clip(grey + rng.uniform(-20, 20), 0, 255)) for _ in range(3))


def _texture(kind: str, h: int, w: int, s: float, rng) -> np.ndarray:
    """A (h, w) pattern in about [-1, 1] for an object of size s pixels."""
    if kind == "flat":
        return np.zeros((h, w), np.float32)
    if kind == "grain":
        small = rng.standard_normal((max(2, h // 4), max(2, w // 4))).astype(np.float32)
        grain = np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))
        return np.clip(grain, -2, 2) / 2
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0, np.pi)
    u = x * math.cos(a) + y * math.sin(a)
    v = -x * math.sin(a) + y * math.cos(a)
    period = max(4.0, s * rng.uniform(0.2, 0.35))
    if kind == "stripes":
        return np.sin(2 * np.pi * u / period)
    if kind == "checker":
        return np.sign(np.sin(2 * np.pi * u / period) * np.sin(2 * np.pi * v / period))
    if kind == "dots":
        spots = np.cos(2 * np.pi * u / period) * np.cos(2 * np.pi * v / period) > 0.6
        return np.where(spots, 1.0, -0.3).astype(np.float32)
    if kind == "gradient":
        return np.clip((u - u.mean()) / max(s, 1.0), -1, 1)
    raise ValueError(f"unknown texture {kind!r}")


def _background(h: int, w: int, rng) -> np.ndarray:
    """Clutter in near-grey colours: blocks, blobs, polygons and thin lines."""
    canvas = Image.new("RGB", (w, h), _dull_colour(rng))
    draw = ImageDraw.Draw(canvas)
    side = min(h, w)
    for _ in range(int(rng.integers(8, 20))):
        kind = rng.integers(4)
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        r = side * rng.uniform(0.05, 0.4)
        box = [cx - r, cy - r * rng.uniform(0.3, 1.0), cx + r, cy + r * rng.uniform(0.3, 1.0)]
        if kind == 0:
            draw.rectangle(box, fill=_dull_colour(rng))
        elif kind == 1:
            draw.ellipse(box, fill=_dull_colour(rng))
        elif kind == 2:
            angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 7))))
            draw.polygon([(cx + r * math.cos(t), cy + r * math.sin(t)) for t in angles], fill=_dull_colour(rng))
        else:
            points = [(cx, cy)] + [(cx + rng.uniform(-r, r) * 2, cy + rng.uniform(-r, r) * 2) for _ in range(2)]
            draw.line(points, fill=_dull_colour(rng), width=max(1, int(side * rng.uniform(0.005, 0.03))))
    image = np.asarray(canvas, np.float32)
    # Soft lighting across the scene.
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0, 2 * np.pi)
    light = 1.0 + 0.15 * ((x * math.cos(a) + y * math.sin(a)) / max(h, w) - 0.5)
    return image * light[..., None]


def render_image(seed: int, image_id: str, classes: list[int], max_side: int, min_side: int,
                 object_scale: float = 1.0):
    """Draw one picture: (rgb uint8 HxWx3, label uint8 HxW, instances uint8 HxW).

    object_scale multiplies every object's size (1: the default spread of sizes).
    label holds class indices 0..20 (no void); instances numbers the visible
    objects 1..N back to front (0 = background), N <= len(classes).
    """
    rng = image_rng(seed, image_id)
    short = int(np.clip(round(max_side * ASPECTS[int(rng.integers(len(ASPECTS)))]), min_side, max_side))
    h, w = (short, max_side) if rng.random() < 0.7 else (max_side, short)
    image = _background(h, w, rng)
    label = np.zeros((h, w), np.uint8)
    instances = np.zeros((h, w), np.uint8)

    # Large objects first, so small ones stay visible on top of them.
    # s: half the object's extent in pixels, log-uniform over a 3x range.
    sizes = [object_scale * CLASS_STYLES[c].size * math.exp(rng.uniform(math.log(0.35), math.log(1.1)))
             * min(h, w) / 2 for c in classes]
    objects = sorted(zip(sizes, classes), key=lambda o: -o[0])

    drawn = 0
    for s, cls in objects:
        style = CLASS_STYLES[cls]
        mask_image = Image.new("L", (w, h), 0)
        pen = Pen(ImageDraw.Draw(mask_image), rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h, s,
                  math.radians(rng.uniform(-style.max_turn, style.max_turn)), bool(rng.random() < 0.5))
        style.shape(pen, rng)
        mask = np.asarray(mask_image) > 0
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        if rows.size == 0:
            continue
        y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        m = mask[y0:y1, x0:x1]
        pattern = _texture(style.texture, y1 - y0, x1 - x0, s, rng)
        jitter = np.asarray(style.colour, np.float32) + rng.uniform(-28, 28, 3).astype(np.float32)
        shade = rng.uniform(0.85, 1.1)
        pixels = (jitter * shade * (1 + 0.25 * pattern[..., None]) + 12 * pattern[..., None])
        image[y0:y1, x0:x1][m] = pixels[m]
        label[y0:y1, x0:x1][m] = cls
        drawn += 1
        instances[y0:y1, x0:x1][m] = drawn

    image += 5 * rng.standard_normal(image.shape, dtype=np.float32)
    rgb = np.clip(image + 0.5, 0, 255).astype(np.uint8)
    # Objects may be fully hidden by later ones: number only the visible ones.
    visible = np.unique(instances)
    renumber = np.zeros(256, np.uint8)
    renumber[visible] = np.arange(len(visible), dtype=np.uint8)
    return rgb, label, renumber[instances]


def void_band(instances: np.ndarray, width: int) -> np.ndarray:
    """Pixels VOC would mark void: a band `width` pixels wide around each object.

    The band lies outside the object's outline, over whatever is behind it
    (background or objects further back), so objects in front, thin ones
    included, keep all their labelled pixels.
    """
    nearest_front = scipy.ndimage.maximum_filter(instances, size=2 * width + 1, mode="constant", cval=0)
    return nearest_front > instances


def _edges(regions: np.ndarray) -> np.ndarray:
    """Pixels whose 4-neighbourhood holds a different region."""
    edge = np.zeros(regions.shape, bool)
    diff_y = regions[1:] != regions[:-1]
    diff_x = regions[:, 1:] != regions[:, :-1]
    edge[1:] |= diff_y
    edge[:-1] |= diff_y
    edge[:, 1:] |= diff_x
    edge[:, :-1] |= diff_x
    return edge


# ------------------------------------------------------------- classifier crops

# The stand-in classifier's pictures (pipelines/train/standin.py) have ids in years no
# VOC id has (a mirror's are 2007-2011), so none of them is a mirror's picture, whatever
# the seeds. One year per split: the held-out pictures are never trained on.
CROP_YEARS = {"train": 9001, "heldout": 9002}
# The scene a crop is cut from: its longer side, in pixels.
CROP_SCENE_SIDE = 256
# Objects per scene: 1, 2 or 3, with these chances.
CROP_OBJECT_CHANCES = (0.4, 0.4, 0.2)
# Pictures per split: an id's number has six digits.
CROP_INDICES = 10 ** 6


def object_crop(seed: int, split: str, index: int, size: int) -> tuple[np.ndarray, int]:
    """One labelled picture for an image classifier: (rgb uint8 size x size x 3, class 1..20).

    A scene of 1-3 objects of random classes (render_image), cut square around one object
    with a random margin and offset, resized to size x size; the label is that object's
    class. The object is the first class's largest, or the largest visible one when that is
    more than eight times its size. Depends on (seed, split, index) only.
    """
    if split not in CROP_YEARS:
        raise ValueError(f"split {split!r}: choose one of {', '.join(CROP_YEARS)}")
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < CROP_INDICES:
        raise ValueError(f"index {index!r}: must be an integer in [0, {CROP_INDICES})")
    year = CROP_YEARS[split]
    # The scene's own generator is image_rng(seed, id); this one, a different stream, picks what is in it.
    rng = np.random.default_rng([seed, year, int(index), 1])
    count = 1 + int(rng.choice(len(CROP_OBJECT_CHANCES), p=CROP_OBJECT_CHANCES))
    classes = [int(c) for c in rng.integers(1, NUM_CLASSES, size=count)]
    rgb, label, instances = render_image(seed, f"{year}_{int(index):06d}", classes, CROP_SCENE_SIDE,
                                         round(0.6 * CROP_SCENE_SIDE))
    # The last object drawn is always visible: its centre lies inside the scene and nothing covers it.
    areas = np.bincount(instances.ravel(), minlength=2)
    areas[0] = 0
    # The first class's largest object, when at least an eighth the size of the largest: larger
    # classes would otherwise be most of the labels.
    first = [k for k in range(1, len(areas)) if areas[k] and label[instances == k][0] == classes[0]]
    chosen = max(first, key=lambda k: areas[k]) if first else 0
    largest = instances == (chosen if areas[chosen] * 8 >= areas.max() else int(areas.argmax()))
    rows, cols = np.flatnonzero(largest.any(1)), np.flatnonzero(largest.any(0))
    h, w = label.shape
    extent = max(rows[-1] + 1 - rows[0], cols[-1] + 1 - cols[0])
    side = int(min(h, w, max(16, round(extent * rng.uniform(1.1, 1.5)))))
    cy = (rows[0] + rows[-1] + 1) / 2 + rng.uniform(-0.1, 0.1) * side
    cx = (cols[0] + cols[-1] + 1) / 2 + rng.uniform(-0.1, 0.1) * side
    top = int(np.clip(round(cy - side / 2), 0, h - side))
    left = int(np.clip(round(cx - side / 2), 0, w - side))
    crop = Image.fromarray(rgb[top:top + side, left:left + side]).resize((size, size), Image.BILINEAR)
    return np.asarray(crop), int(label[largest][0])


def object_crops(seed: int, split: str, start: int, count: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """object_crop for indices start .. start + count - 1: (uint8 count x size x size x 3, int64 classes)."""
    crops = [object_crop(seed, split, i, size) for i in range(start, start + count)]
    return np.stack([c[0] for c in crops]), np.asarray([c[1] for c in crops], np.int64)


# ---------------------------------------------------------------------- encoding

def encode_jpeg(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def encode_voc_label(label: np.ndarray) -> bytes:
    """A VOC SegmentationClass PNG: mode 'P', VOC colour map, values are classes."""
    h, w = label.shape
    image = Image.frombytes("P", (w, h), np.ascontiguousarray(label).tobytes())
    image.putpalette(voc_colormap().tobytes())
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _savemat(mdict: dict) -> bytes:
    buf = io.BytesIO()
    scipy.io.savemat(buf, mdict, do_compression=True)
    data = bytearray(buf.getvalue())
    data[:len(MAT_HEADER)] = MAT_HEADER
    return bytes(data)


def _sparse_cells(masks: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    cells = np.empty((shape[0], shape[1]), dtype=object)
    for i, mask in enumerate(masks):
        cells.flat[i] = scipy.sparse.csc_matrix(mask)
    return cells


def encode_sbd_cls(label: np.ndarray) -> bytes:
    """SBD cls/<id>.mat: struct GTcls with Segmentation, Boundaries, CategoriesPresent."""
    edge = _edges(label)
    # Boundaries is a 20x1 cell, as in the release (torchvision's SBDataset reads Boundaries[i][0]).
    present = [c for c in range(1, NUM_CLASSES) if (label == c).any()]
    gtcls = {
        "Segmentation": label.astype(np.uint8),
        "Boundaries": _sparse_cells([edge & (label == c) for c in range(1, NUM_CLASSES)], (NUM_CLASSES - 1, 1)),
        "CategoriesPresent": np.asarray(present, np.float64).reshape(-1, 1),
    }
    return _savemat({"GTcls": gtcls})


def encode_sbd_inst(instances: np.ndarray, label: np.ndarray) -> bytes:
    """SBD inst/<id>.mat: struct GTinst with Segmentation, Boundaries, Categories."""
    edge = _edges(instances)
    n = int(instances.max())
    categories = [int(label[instances == i][0]) for i in range(1, n + 1)]
    gtinst = {
        "Segmentation": instances.astype(np.uint8),
        "Boundaries": _sparse_cells([edge & (instances == i) for i in range(1, n + 1)], (n, 1)),
        "Categories": np.asarray(categories, np.float64).reshape(-1, 1),
    }
    return _savemat({"GTinst": gtinst})


def make_files(task: tuple) -> dict[str, bytes]:
    """All archive members for one image id: {archive: {member path: bytes}}."""
    seed, image_id, classes, max_side, min_side, object_scale, in_voc, in_sbd = task
    rgb, label, instances = render_image(seed, image_id, classes, max_side, min_side, object_scale)
    jpeg = encode_jpeg(rgb)
    files = {"voc": {}, "sbd": {}}
    if in_voc:
        width = max(1, round(max(label.shape) / 100))  # ~5 px at VOC's 500 px
        voc_label = np.where(void_band(instances, width), VOID, label).astype(np.uint8)
        files["voc"][f"{VOC_ROOT}/JPEGImages/{image_id}.jpg"] = jpeg
        files["voc"][f"{VOC_ROOT}/SegmentationClass/{image_id}.png"] = encode_voc_label(voc_label)
    if in_sbd:
        files["sbd"][f"{SBD_ROOT}/img/{image_id}.jpg"] = jpeg
        files["sbd"][f"{SBD_ROOT}/cls/{image_id}.mat"] = encode_sbd_cls(label)
        files["sbd"][f"{SBD_ROOT}/inst/{image_id}.mat"] = encode_sbd_inst(instances, label)
    return files


# ---------------------------------------------------------------------- archives

def _id_list(ids: list[str]) -> bytes:
    return "".join(f"{i}\n" for i in ids).encode()


def write_archive(path: Path, files: dict[str, bytes], compress: bool) -> str:
    """Write a reproducible tar (or tar.gz) of files; return its md5.

    Members are sorted, parent directories included, with a fixed mtime, owner
    root/root without names, and fixed modes. The file appears under its name
    only when complete.
    """
    dirs = {str(Path(name).parents[i]) for name in files for i in range(len(Path(name).parents) - 1)}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as raw, (
            # No file name and mtime 0 in the gzip header: same bytes on every run.
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) if compress
            else contextlib.nullcontext(raw)
        ) as stream:
            with tarfile.open(fileobj=stream, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for name in sorted(dirs | set(files)):
                    info = tarfile.TarInfo(name)
                    info.mtime, info.uid, info.gid, info.uname, info.gname = ARCHIVE_MTIME, 0, 0, "", ""
                    if name in files:
                        info.size, info.mode = len(files[name]), 0o644
                        tar.addfile(info, io.BytesIO(files[name]))
                    else:
                        info.type, info.mode = tarfile.DIRTYPE, 0o755
                        tar.addfile(info)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return file_md5(path)


def write_mirror(out_dir, *, n_train: int = 300, n_val: int = 100, seed: int = 0, max_side: int = 500,
                 min_side: Optional[int] = None, objects: tuple[int, int] = OBJECTS, object_scale: float = 1.0,
                 workers: int = 0, progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """Write VOCtrainval_11-May-2012.tar and benchmark.tgz into out_dir.

    n_train: SBD training images; n_val: seg11valid ids (at most 736) in VOC's
    val list; max_side: the longer image side (VOC: 500); min_side: the smallest
    shorter side (default 60% of max_side); objects: the fewest and most objects an
    image holds; object_scale: multiplies every object's size (fewer, larger objects
    give coarse outputs something to score: the stride-32 ceiling rises with object
    size); workers: processes (0 = all cores);
    progress(done, total) is called as images finish.
    Returns {"voc": Path, "sbd": Path, "md5": {"voc": hex, "sbd": hex}}.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UsageError(f"seed = {seed!r}: must be a non-negative integer")
    if max_side < 32:
        raise UsageError(f"max_side = {max_side}: must be at least 32 pixels")
    min_side = round(0.6 * max_side) if min_side is None else min_side
    if not 16 <= min_side <= max_side:
        raise UsageError(f"min_side = {min_side}: must be between 16 and max_side ({max_side})")
    if workers < 0:
        raise UsageError(f"workers = {workers}: must be >= 0 (0 = all cores)")
    low, high = objects
    if not 1 <= low <= high <= 20:
        raise UsageError(f"objects = {low}..{high}: need 1 <= fewest <= most <= 20 objects per image")
    if not 0.1 <= object_scale <= 4.0:
        raise UsageError(f"object_scale = {object_scale}: must be between 0.1 and 4 (1 = the default sizes)")
    lists = plan_mirror(n_train, n_val, seed)
    classes = {**plan_classes(lists["train"], seed, 1, objects), **plan_classes(lists["val"], seed, 2, objects)}
    in_voc, in_sbd = set(lists["voc_trainval"]), set(lists["sbd_train"] + lists["sbd_val"])
    tasks = [(seed, i, classes[i], max_side, min_side, object_scale, i in in_voc, i in in_sbd)
             for i in sorted(in_voc | in_sbd)]

    voc_files = {
        f"{VOC_ROOT}/ImageSets/Segmentation/train.txt": _id_list(lists["voc_train"]),
        f"{VOC_ROOT}/ImageSets/Segmentation/val.txt": _id_list(lists["voc_val"]),
        f"{VOC_ROOT}/ImageSets/Segmentation/trainval.txt": _id_list(lists["voc_trainval"]),
    }
    sbd_files = {
        f"{SBD_ROOT}/train.txt": _id_list(lists["sbd_train"]),
        f"{SBD_ROOT}/val.txt": _id_list(lists["sbd_val"]),
    }
    workers = min(workers or os.cpu_count() or 1, len(tasks))
    pool = multiprocessing.Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(make_files, tasks, chunksize=max(1, len(tasks) // (8 * workers))) if pool else map(
            make_files, tasks)
        for done, files in enumerate(results, 1):
            voc_files.update(files["voc"])
            sbd_files.update(files["sbd"])
            if progress:
                progress(done, len(tasks))
    finally:
        if pool:
            pool.terminate()
            pool.join()

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    voc_path, sbd_path = out_dir / VOC_ARCHIVE, out_dir / SBD_ARCHIVE
    return {
        "voc": voc_path,
        "sbd": sbd_path,
        "md5": {"voc": write_archive(voc_path, voc_files, compress=False),
                "sbd": write_archive(sbd_path, sbd_files, compress=True)},
    }


def params_snippet(result: dict) -> str:
    """The params.yaml lines that point data.local_dir at a written mirror."""
    local_dir = Path(result["voc"]).resolve().parent
    return (
        "data:\n"
        f"  local_dir: {local_dir}\n"
        f"  voc: {{filename: {VOC_ARCHIVE}, md5: {result['md5']['voc']}, mirrors: []}}\n"
        f"  sbd: {{filename: {SBD_ARCHIVE}, md5: {result['md5']['sbd']}, mirrors: []}}\n"
    )
