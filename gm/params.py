"""The whole ``params.yaml``: known top-level sections and cross-section checks.

Each DVC stage reads only its own section, but validates the file as a whole first, so a typo
anywhere (``dataset:`` for ``datasets:``) stops the pipeline with the key's name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from gm.config import from_dict, load_yaml
from gm.data.config import DatasetConfig, PairConfig
from gm.errors import ConfigError

# Sections later stages own are added here as they land.
SECTIONS = ("datasets", "pairs", "train", "evaluate")


@dataclass(frozen=True)
class Params:
    datasets: dict[str, DatasetConfig]
    pairs: dict[str, PairConfig]
    train: dict[str, Any]  # name → gm.train.job.TrainConfig
    evaluate: Any  # gm.metrics.evaluate.EvalConfig


def parse(raw: dict[str, Any], source: str = "params.yaml") -> Params:
    try:
        return _parse(raw)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _parse(raw: dict[str, Any]) -> Params:
    for key in raw:
        if key not in SECTIONS:
            raise ConfigError(
                f"{key}: unknown top-level key (expected one of: {', '.join(SECTIONS)})"
            )
    datasets_raw = raw.get("datasets") or {}
    pairs_raw = raw.get("pairs") or {}
    train_raw = raw.get("train") or {}
    for key, node in (("datasets", datasets_raw), ("pairs", pairs_raw), ("train", train_raw)):
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: expected a mapping of names, got {node!r}")
    datasets = {}
    for name, node in datasets_raw.items():
        _check_name("datasets", name)
        datasets[name] = from_dict(DatasetConfig, node or {}, f"datasets.{name}")
    pairs = {}
    for name, node in pairs_raw.items():
        _check_name("pairs", name)
        cfg = from_dict(PairConfig, node or {}, f"pairs.{name}")
        if cfg.dataset not in datasets:
            raise ConfigError(
                f"pairs.{name}.dataset: {cfg.dataset!r} is not a key of datasets "
                f"({', '.join(datasets) or 'none'})"
            )
        top = datasets[cfg.dataset].top_resolution
        if cfg.resolution != top:
            raise ConfigError(
                f"pairs.{name}.resolution: {cfg.resolution} must equal "
                f"datasets.{cfg.dataset}.top_resolution ({top})"
            )
        pairs[name] = cfg
    from gm.metrics.evaluate import EvalConfig

    node = raw.get("evaluate") or {}
    evaluate = from_dict(EvalConfig, node, "evaluate")
    return Params(datasets, pairs, _parse_train(train_raw, datasets), evaluate)


def _parse_train(train_raw: dict[str, Any], datasets: dict[str, DatasetConfig]) -> dict[str, Any]:
    from gm.train.job import TrainConfig  # imports no torch; the family check below does

    train = {}
    for name, node in train_raw.items():
        _check_name("train", name)
        cfg = from_dict(TrainConfig, node or {}, f"train.{name}")
        cfg.family_config(f"train.{name}")
        if cfg.dataset not in datasets:
            raise ConfigError(
                f"train.{name}.dataset: {cfg.dataset!r} is not a key of datasets "
                f"({', '.join(datasets) or 'none'})"
            )
        top = datasets[cfg.dataset].top_resolution
        if cfg.resolution > top:
            raise ConfigError(
                f"train.{name}.resolution: {cfg.resolution} is above "
                f"datasets.{cfg.dataset}.top_resolution ({top})"
            )
        train[name] = cfg
    return train


def _check_name(section: str, name: object) -> None:
    if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(f"{section}.{name}: names are letters, digits, '_' and '-' only")


def load(path: str | os.PathLike = "params.yaml") -> Params:
    return parse(load_yaml(path), str(path))
