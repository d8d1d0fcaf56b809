"""PASCAL VOC facts every part of the project shares: the classes and the void label.

    class_names()   the 21 names, index = class id (background first)
    NUM_CLASSES     21
    VOID            255: the label of pixels no score counts (object borders, padding)

Plain Python: importing this needs neither torch nor numpy.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

CLASSES_FILE = Path(__file__).with_name("voc_classes.txt")
NUM_CLASSES = 21
VOID = 255


@lru_cache(maxsize=None)
def _class_names() -> tuple[str, ...]:
    names = tuple(CLASSES_FILE.read_text().split())
    if len(names) != NUM_CLASSES:
        raise ValueError(f"{CLASSES_FILE}: lists {len(names)} classes, expected {NUM_CLASSES}")
    return names


def class_names() -> list[str]:
    """The 21 VOC class names, background first."""
    return list(_class_names())


def names_for(num_classes: int) -> list[str]:
    """Class names for a model of num_classes outputs: VOC's when it has 21, else "class i"."""
    return class_names() if num_classes == NUM_CLASSES else [f"class {i}" for i in range(num_classes)]
