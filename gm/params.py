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
SECTIONS = ("datasets", "pairs", "train", "train_paired", "train_codec", "evaluate", "tune", "rd",
            "detect")  # fmt: skip
# Sections of training jobs (gm.train.job.TrainConfig), in the order job names are looked up.
JOB_SECTIONS = ("train", "train_paired", "train_codec")


@dataclass(frozen=True)
class Params:
    datasets: dict[str, DatasetConfig]
    pairs: dict[str, PairConfig]
    train: dict[str, Any]  # name → gm.train.job.TrainConfig
    evaluate: Any  # gm.metrics.evaluate.EvalConfig
    train_paired: dict[str, Any]  # name → gm.train.job.TrainConfig (SRGAN, pix2pix, CycleGAN)
    tune: dict[str, Any]  # name → gm.tune.SearchConfig
    train_codec: dict[str, Any]  # name → gm.train.job.TrainConfig (learned codecs)
    rd: dict[str, Any]  # name → gm.metrics.rd.RDConfig
    detect: dict[str, Any]  # name → gm.detect.DetectConfig

    def jobs_of(self, dataset: str) -> list[str]:
        """Names of the ``train`` jobs (sampling models) on ``dataset``, in file order."""
        return [name for name, cfg in self.train.items() if cfg.dataset == dataset]

    def job(self, name: str) -> tuple[str, Any]:
        """(section, TrainConfig) of training job ``name``: a job's name, looked up in train,
        train_paired and train_codec in that order, or its params key ``SECTION.NAME``
        (``train.dcgan``). Raises KeyError where there is no such job."""
        section, _, bare = name.rpartition(".")
        for s in (section,) if section else JOB_SECTIONS:
            jobs = getattr(self, s) if s in JOB_SECTIONS else {}
            if bare in jobs:
                return s, jobs[bare]
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
    codec_raw = raw.get("train_codec") or {}
    rd_raw = raw.get("rd") or {}
    detect_raw = raw.get("detect") or {}
    for key, node in (
        ("tune", tune_raw),
        ("detect", detect_raw),
        ("train_codec", codec_raw),
        ("rd", rd_raw),
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
    codecs = _parse_train(codec_raw, datasets, section="train_codec")
    seen: dict[str, str] = {}
    for section, jobs in (("train", train), ("train_paired", paired), ("train_codec", codecs)):
        for name in jobs:
            if name in seen:
                raise ConfigError(f"{section}.{name}: a job of that name is in {seen[name]} too")
            seen[name] = section
    result = Params(datasets, pairs, train, evaluate, paired, {}, codecs, {}, {})
    result.tune.update(_parse_tune(tune_raw, result))
    result.rd.update(_parse_rd(rd_raw, result))
    result.detect.update(_parse_detect(detect_raw, result))
    return result


def _parse_detect(raw: dict[str, Any], p: Params) -> dict[str, Any]:
    """Detection stages: a dataset whose train jobs' samples a detector learns to tell from
    its real images."""
    from gm.detect import DetectConfig

    out = {}
    for name, node in raw.items():
        _check_name("detect", name)
        where = f"detect.{name}"
        cfg = from_dict(DetectConfig, node or {}, where)
        _check_dataset(where, cfg.dataset, p)
        if not p.jobs_of(cfg.dataset):
            raise ConfigError(f"{where}.dataset: no job of train samples {cfg.dataset}; "
                              "the detector needs a model's samples")  # fmt: skip
        out[name] = cfg
    return out


def _parse_rd(raw: dict[str, Any], p: Params) -> dict[str, Any]:
    """Rate–distortion evaluations: a learned codec's λ sweep (a tune entry keeping its
    checkpoints, over a train_codec job) on an RGB dataset."""
    from gm.metrics.rd import RDConfig

    out = {}
    for name, node in raw.items():
        _check_name("rd", name)
        where = f"rd.{name}"
        cfg = from_dict(RDConfig, node or {}, where)
        _check_dataset(where, cfg.dataset, p)
        if p.datasets[cfg.dataset].channels != 3:
            raise ConfigError(f"{where}.dataset: {cfg.dataset} is not RGB (channels: "
                              f"{p.datasets[cfg.dataset].channels}); the baselines code "
                              "RGB")  # fmt: skip
        if cfg.layout == "blocks" and p.datasets[cfg.dataset].split_by != "block":
            raise ConfigError(f"{where}.layout: blocks needs datasets.{cfg.dataset}.split_by: "
                              f"block (it is {p.datasets[cfg.dataset].split_by}); or set "
                              "layout: mosaic")  # fmt: skip
        sweep = p.tune.get(cfg.sweep)
        if sweep is None:
            raise ConfigError(f"{where}.sweep: {cfg.sweep!r} is not a key of tune "
                              f"({', '.join(p.tune) or 'none'})")  # fmt: skip
        if p.job(sweep.job)[0] != "train_codec":
            raise ConfigError(f"{where}.sweep: tune.{cfg.sweep} searches {sweep.job}, not a job "
                              f"of train_codec ({', '.join(p.train_codec) or 'none'})")  # fmt: skip
        if not sweep.keep_checkpoints:
            raise ConfigError(f"{where}.sweep: tune.{cfg.sweep} does not keep its checkpoints; "
                              "set keep_checkpoints: true there")  # fmt: skip
        out[name] = cfg
    return out


def _parse_tune(raw: dict[str, Any], p: Params) -> dict[str, Any]:
    """Searches: each names a training job by its params key (``train.dcgan``), the one
    params dependency of its DVC stage besides its own entry, and a space over the job's
    config's keys."""
    from gm.tune import SearchConfig, check_search

    out = {}
    keys = [f"{s}.{j}" for s in JOB_SECTIONS for j in getattr(p, s)]
    for name, node in raw.items():
        _check_name("tune", name)
        where = f"tune.{name}"
        cfg = from_dict(SearchConfig, node or {}, where)
        if cfg.job not in keys:
            hint = [k for k in keys if k.rpartition(".")[2] == cfg.job]
            raise ConfigError(
                f"{where}.job: {cfg.job!r} "
                + (
                    f"names no section: write {hint[0]} (the tune stage depends on that "
                    "params key alone)"
                    if hint
                    else f"is not a job's params key ({', '.join(keys) or 'no jobs'})"
                )
            )
        _, job = p.job(cfg.job)
        check_search(cfg, job, where)
        out[name] = cfg
    return out


def _parse_train(
    train_raw: dict[str, Any], datasets: dict[str, DatasetConfig], section: str = "train"
) -> dict[str, Any]:
    """Jobs of ``train`` (sampling families, scored by the evaluate stage) or of
    ``train_codec`` (learned codecs, scored by the rd stage) on a prepared dataset."""
    from gm.registry import families
    from gm.train.job import TrainConfig  # imports no torch; the family check below does

    train = {}
    for name, node in train_raw.items():
        _check_name(section, name)
        where = f"{section}.{name}"
        cfg = from_dict(TrainConfig, node or {}, where)
        cfg.family_config(where)
        fam = families()[cfg.family]
        if fam.pairs:
            raise ConfigError(
                f"{where}.family: {cfg.family} trains from {fam.pairs} pairs: "
                "put the job under train_paired"
            )
        if (cfg.family == "codec") != (section == "train_codec"):
            raise ConfigError(
                f"{where}.family: learned codecs go under train_codec (scored by the rd stage), "
                "sampling families under train"
            )
        if not cfg.dataset:
            raise ConfigError(f"{where}.dataset: required key is missing")
        if cfg.dataset not in datasets:
            raise ConfigError(
                f"{where}.dataset: {cfg.dataset!r} is not a key of datasets "
                f"({', '.join(datasets) or 'none'})"
            )
        top = datasets[cfg.dataset].top_resolution
        if cfg.resolution > top:
            raise ConfigError(
                f"{where}.resolution: {cfg.resolution} is above "
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


def _check_dataset(where: str, dataset: str, p: Params) -> None:
    if dataset not in p.datasets:
        raise ConfigError(f"{where}.dataset: {dataset!r} is not a key of datasets "
                          f"({', '.join(p.datasets) or 'none'})")  # fmt: skip


def _check_name(section: str, name: object) -> None:
    if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(f"{section}.{name}: names are letters, digits, '_' and '-' only")


def load(path: str | os.PathLike = "params.yaml") -> Params:
    return parse(load_yaml(path), str(path))
