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
SECTIONS = ("datasets", "pairs", "train", "train_paired", "evaluate", "tune")


@dataclass(frozen=True)
class Params:
    datasets: dict[str, DatasetConfig]
    pairs: dict[str, PairConfig]
    train: dict[str, Any]  # name → gm.train.job.TrainConfig
    evaluate: Any  # gm.metrics.evaluate.EvalConfig
    train_paired: dict[str, Any]  # name → gm.train.job.TrainConfig (SRGAN, pix2pix, CycleGAN)
    tune: dict[str, Any]  # name → gm.tune.SearchConfig

    def job(self, name: str) -> tuple[str, Any]:
        """(section, TrainConfig) of training job ``name`` (train or train_paired)."""
        for section in ("train", "train_paired"):
            jobs = getattr(self, section)
            if name in jobs:
                return section, jobs[name]
        raise KeyError(name)


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
    paired_raw = raw.get("train_paired") or {}
    tune_raw = raw.get("tune") or {}
    for key, node in (
        ("tune", tune_raw),
        ("datasets", datasets_raw),
        ("pairs", pairs_raw),
        ("train", train_raw),
        ("train_paired", paired_raw),
    ):
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
    train = _parse_train(train_raw, datasets)
    paired = _parse_paired(paired_raw, pairs)
    both = sorted(set(train) & set(paired))
    if both:
        raise ConfigError(f"train_paired.{both[0]}: a job of that name is in train too")
    result = Params(datasets, pairs, train, evaluate, paired, {})
    result.tune.update(_parse_tune(tune_raw, result))
    return result


def _parse_tune(raw: dict[str, Any], p: Params) -> dict[str, Any]:
    """Searches: each names a training job and a space over its config's keys."""
    from gm.tune import SearchConfig, check_search

    out = {}
    for name, node in raw.items():
        _check_name("tune", name)
        where = f"tune.{name}"
        cfg = from_dict(SearchConfig, node or {}, where)
        try:
            _, job = p.job(cfg.job)
        except KeyError:
            jobs = ", ".join([*p.train, *p.train_paired]) or "none"
            raise ConfigError(
                f"{where}.job: {cfg.job!r} is not a job of train or train_paired ({jobs})"
            ) from None
        check_search(cfg, job, where)
        out[name] = cfg
    return out


def _parse_train(train_raw: dict[str, Any], datasets: dict[str, DatasetConfig]) -> dict[str, Any]:
    from gm.registry import families
    from gm.train.job import TrainConfig  # imports no torch; the family check below does

    train = {}
    for name, node in train_raw.items():
        _check_name("train", name)
        cfg = from_dict(TrainConfig, node or {}, f"train.{name}")
        cfg.family_config(f"train.{name}")
        fam = families()[cfg.family]
        if fam.pairs:
            raise ConfigError(
                f"train.{name}.family: {cfg.family} trains from {fam.pairs} pairs: "
                "put the job under train_paired"
            )
        if not cfg.dataset:
            raise ConfigError(f"train.{name}.dataset: required key is missing")
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


def _parse_paired(raw: dict[str, Any], pairs: dict[str, PairConfig]) -> dict[str, Any]:
    """Jobs of paired families: ``pairs`` names a paired dataset of the family's kind."""
    from gm.registry import families
    from gm.train.job import TrainConfig

    out = {}
    for name, node in raw.items():
        _check_name("train_paired", name)
        where = f"train_paired.{name}"
        cfg = from_dict(TrainConfig, node or {}, where)
        model_cfg = cfg.family_config(where)
        kind = families()[cfg.family].pairs
        if kind is None:
            raise ConfigError(
                f"{where}.family: {cfg.family} does not train from pairs: put the job under train"
            )
        if cfg.pairs not in pairs:
            raise ConfigError(
                f"{where}.pairs: {cfg.pairs!r} is not a key of pairs ({', '.join(pairs) or 'none'})"
            )
        pcfg = pairs[cfg.pairs]
        if pcfg.kind != kind:
            raise ConfigError(
                f"{where}.pairs: {cfg.pairs} holds {pcfg.kind} pairs; {cfg.family} needs {kind}"
            )
        scale = getattr(model_cfg, "scale", None)
        if kind == "super_resolution" and scale not in pcfg.scales:
            raise ConfigError(
                f"{where}.model.scale: {scale} is not one of pairs.{cfg.pairs}.scales "
                f"({', '.join(map(str, pcfg.scales))})"
            )
        out[name] = cfg
    return out


def _check_name(section: str, name: object) -> None:
    if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(f"{section}.{name}: names are letters, digits, '_' and '-' only")


def load(path: str | os.PathLike = "params.yaml") -> Params:
    return parse(load_yaml(path), str(path))
