"""The one table of model families: name → (config dataclass, builder).

Families register themselves with :func:`register` when their module is imported;
:func:`families` imports ``gm.models`` so the table is complete. ``gm models`` lists it.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Family:
    name: str  # short lower-case key used in params.yaml and on the command line
    config: type  # frozen dataclass of the family's hyperparameters
    build: Callable[[Any], Any]  # config -> model (the training protocol object)
    paper: str  # the reference it implements
    # Paired families: the `pairs` kind they train from (super_resolution, translation); None:
    # the family trains on a multi-resolution dataset (params.yaml: train)
    pairs: str | None = None


_FAMILIES: dict[str, Family] = {}


def register(name: str, config: type, paper: str, pairs: str | None = None) -> Callable:
    """Decorator for a family's builder: ``@register("dcgan", DCGANConfig, "Radford ...")``."""

    def deco(build: Callable) -> Callable:
        if name in _FAMILIES:
            raise ValueError(f"model family {name!r} registered twice")
        _FAMILIES[name] = Family(name, config, build, paper, pairs)
        return build

    return deco


def families() -> dict[str, Family]:
    try:
        pkg = importlib.import_module("gm.models")
    except ModuleNotFoundError:
        return dict(_FAMILIES)
    for mod in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"gm.models.{mod.name}")
    return dict(sorted(_FAMILIES.items()))
