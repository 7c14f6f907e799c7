from __future__ import annotations

import json
from typing import Literal

import pytest
import yaml

from gm import params
from gm.cli import main as gm_main
from gm.config import check_literal, from_dict, yaml_load
from gm.data.config import DatasetConfig, PairConfig
from gm.errors import ConfigError

from .conftest import REPO


def write(tmp_path, data) -> str:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


def base():
    return {
        "datasets": {"toy": {"top_resolution": 32}},
        "pairs": {"toy_sr": {"kind": "super_resolution", "dataset": "toy", "resolution": 32}},
        "train": {"gan": {"family": "cgan", "dataset": "toy", "model": {"ngf": 16}}},
    }


def test_repository_params_are_valid():
    p = params.load(REPO / "params.yaml")
    assert set(p.datasets) == {"emoji", "digits", "photos"}
    assert p.datasets["digits"].channels == 1
    assert p.datasets["emoji"].resolutions == [4, 8, 16, 32, 64]
    assert p.pairs["photos_sr"].scales == (2, 4)
    assert {cfg.family for cfg in p.train.values()} >= {"dcgan", "cgan", "cvae"}


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["datasets"]["toy"].update(top_res=32), "datasets.toy.top_res: unknown key"),
        (
            lambda d: d["datasets"]["toy"].update(top_resolution=48),
            "datasets.toy.top_resolution: 48 is not a power of two",
        ),
        (
            lambda d: d["datasets"]["toy"].update(top_resolution="64"),
            "datasets.toy.top_resolution: expected an integer",
        ),
        (
            lambda d: d["datasets"]["toy"].update(top_resolution=2),
            "datasets.toy.top_resolution: 2 is not a power of two >= 4",
        ),
        (lambda d: d["datasets"]["toy"].update(fit="stretch"), "datasets.toy.fit: 'stretch'"),
        (lambda d: d["datasets"]["toy"].update(channels=4), "datasets.toy.channels: 4"),
        (lambda d: d["datasets"]["toy"].update(background=[0, 0, 300]), "datasets.toy.background"),
        (
            lambda d: d["datasets"]["toy"].update(split={"train": 0.9, "val": 0.2, "test": 0.1}),
            "datasets.toy.split.train: train + val + test must sum to 1",
        ),
        (
            lambda d: d["datasets"]["toy"].update(split={"train": 1.0, "tset": 0.0}),
            "datasets.toy.split.tset: unknown key",
        ),
        (lambda d: d.update(dataset={}), "dataset: unknown top-level key"),
        (
            lambda d: d["pairs"]["toy_sr"].update(dataset="nope"),
            "pairs.toy_sr.dataset: 'nope' is not a key of datasets",
        ),
        (
            lambda d: d["pairs"]["toy_sr"].update(resolution=16),
            "pairs.toy_sr.resolution: 16 must equal datasets.toy.top_resolution (32)",
        ),
        (lambda d: d["pairs"]["toy_sr"].update(scales=[3]), "pairs.toy_sr.scales[0]: 3"),
        (
            lambda d: d["pairs"]["toy_sr"].update(degradation={"jpeg_quality": 100}),
            "pairs.toy_sr.degradation.jpeg_quality: 100",
        ),
        (lambda d: d["pairs"]["toy_sr"].pop("kind"), "pairs.toy_sr.kind: required key is missing"),
        (lambda d: d["datasets"]["toy"].update(on_invalid=True), "datasets.toy.on_invalid"),
        (
            lambda d: d["train"]["gan"].update(family="biggan"),
            "train.gan.family: unknown model family 'biggan'",
        ),
        (
            lambda d: d["train"]["gan"]["model"].update(ngff=3),
            "train.gan.model.ngff: unknown key",
        ),
        (
            lambda d: d["train"]["gan"]["model"].update(d_conditioning="dot"),
            "train.gan.model.d_conditioning: 'dot' is not one of",
        ),
        (
            lambda d: d["train"]["gan"].update(run={"steps": 0}),
            "train.gan.run.steps: must be >= 1",
        ),
        (
            lambda d: d["train"]["gan"].update(run={"kid_samples": 4}),
            "train.gan.run.kid_samples: must be 0 (off) or >= 8",
        ),
        (
            lambda d: d["train"]["gan"].update(run={"batch_size": "64"}),
            "train.gan.run.batch_size: expected an integer",
        ),
        (
            lambda d: d["train"]["gan"].update(dataset="nope"),
            "train.gan.dataset: 'nope' is not a key of datasets",
        ),
        (
            lambda d: d["train"]["gan"].update(resolution=64),
            "train.gan.resolution: 64 is above datasets.toy.top_resolution (32)",
        ),
        (
            lambda d: d["train"]["gan"].update(resolution=12),
            "train.gan.resolution: 12 is not 0 or",
        ),
    ],
)
def test_bad_params_name_the_key(tmp_path, mutate, message):
    data = base()
    mutate(data)
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as e:
        params.load(path)
    assert str(e.value).startswith(f"{path}: ")
    assert message in str(e.value)


def test_malformed_yaml_names_the_file(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("datasets: {toy: [unclosed\n")
    with pytest.raises(ConfigError, match=f"{p}: not valid YAML"):
        params.load(p)


@pytest.mark.parametrize(
    "text, value",
    [("5e-4", 0.0005), ("1E3", 1000.0), (".5", 0.5), ("-2.5e+3", -2500.0), ("0.001", 0.001),
     ("3", 3), ("1e", "1e"), ("e3", "e3"), ("'5e-4'", "5e-4")],
)  # fmt: skip
def test_yaml_reads_exponent_floats_as_dvc_does(text, value):
    """PyYAML alone (YAML 1.1) reads `lr: 5e-4` as a string; gm and DVC (ruamel.yaml, YAML
    1.2) both read the number, and integers and quoted strings keep their types."""
    from ruamel.yaml import YAML

    got = yaml_load(f"lr: {text}")["lr"]
    assert got == value and type(got) is type(value)
    dvc = YAML(typ="safe", pure=True).load(f"lr: {text}")["lr"]
    assert dvc == value and type(dvc) is type(value)


def test_an_exponent_learning_rate_in_params_and_in_set(tmp_path):
    from gm.cli import _parse_override

    data = base()
    data["train"]["gan"]["model"]["optim_g"] = {"lr": "LR"}
    text = yaml.safe_dump(data).replace("lr: LR", "lr: 5e-4")
    path = tmp_path / "params.yaml"
    path.write_text(text)
    assert yaml.safe_load(text)["train"]["gan"]["model"]["optim_g"]["lr"] == "5e-4"  # PyYAML's
    cfg = params.load(path).job("gan")[1].family_config("train.gan")
    assert cfg.optim_g.lr == 0.0005 and cfg.ngf == 16
    assert _parse_override("model.optim_d.lr=2e-3") == (["model", "optim_d", "lr"], 0.002)
    assert _parse_override("model.style=demod") == (["model", "style"], "demod")


def test_bool_is_not_an_integer():
    with pytest.raises(ConfigError, match="top_resolution: expected an integer, got True"):
        from_dict(DatasetConfig, {"top_resolution": True})


def test_check_literal_returns_a_choice_and_names_the_key_otherwise():
    Mode = Literal["a", "b"]
    assert check_literal("b", Mode, "x.mode") == "b"
    with pytest.raises(ConfigError, match=r"^x\.mode: 'c' is not one of 'a' \| 'b'$"):
        check_literal("c", Mode, "x.mode")


def test_defaults_and_resolutions():
    cfg = DatasetConfig(top_resolution=256)
    assert cfg.resolutions == [4, 8, 16, 32, 64, 128, 256]
    assert PairConfig(kind="conditional", dataset="x", resolution=8).scales == (2, 4)


def test_cli_exits_2_with_the_key_and_no_traceback(tmp_path, capsys):
    data = base()
    data["datasets"]["toy"]["colour"] = 3
    path = write(tmp_path, data)
    assert gm_main(["prepare", "--params", path, "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "datasets.toy.colour: unknown key" in err and "Traceback" not in err


def test_a_partial_section_keeps_the_familys_own_defaults():
    """`optim: {lr: …}` overrides the lr and keeps the family's betas and gradient clipping
    (not the bare OptimConfig's), nested sections too; unknown keys are still named."""
    from gm.models.codec import CodecConfig
    from gm.models.progan import ProGANConfig

    default = CodecConfig().optim
    got = from_dict(CodecConfig, {"optim": {"lr": 5e-4}}, "codec").optim
    assert got.lr == 5e-4 and got.betas == default.betas and got.grad_clip == default.grad_clip
    assert default.grad_clip == 1.0 and default.betas == (0.9, 0.999)  # not GAN defaults
    grown = from_dict(ProGANConfig, {"growth": {"fade_images": 10}}, "progan").growth
    assert grown.fade_images == 10 and grown.stable_images == ProGANConfig().growth.stable_images
    with pytest.raises(ConfigError, match="codec.optim.bogus: unknown key"):
        from_dict(CodecConfig, {"optim": {"bogus": 1}}, "codec")


def test_int_mapping_keys_read_back_from_json_and_bad_keys_name_the_key():
    # a checkpoint stores the config as JSON: {8: …} comes back as {"8": …}
    from gm.models.growth import GrowthConfig

    data = json.loads(json.dumps({"per_resolution": {8: {"lr": 0.002}, 16: {}}}))
    assert set(data["per_resolution"]) == {"8", "16"}
    cfg = from_dict(GrowthConfig, data, "growth")
    assert set(cfg.per_resolution) == {8, 16} and cfg.per_resolution[8].lr == 0.002
    for bad in ("--8", "²", "8x"):
        with pytest.raises(ConfigError, match="growth.per_resolution: expected an integer"):
            from_dict(GrowthConfig, {"per_resolution": {bad: {}}}, "growth")
