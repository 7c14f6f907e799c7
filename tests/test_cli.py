from __future__ import annotations

import subprocess

import pytest
import yaml

from gm.cli import build_parser, main

from .conftest import BIN, random_rgb, save


def subcommands(parser, prefix=()):
    """Every (sub)command path of the gm parser."""
    import argparse

    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from subcommands(sub, (*prefix, name))


def test_console_script_help():
    out = subprocess.run([BIN / "gm", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("data", "prepare", "models"):
        assert cmd in out.stdout


@pytest.mark.parametrize("path", list(subcommands(build_parser())), ids=" ".join)
def test_every_subcommand_has_help(path, capsys):
    with pytest.raises(SystemExit) as e:
        main([*path, "--help"])
    assert e.value.code == 0
    assert "usage: gm" in capsys.readouterr().out


def test_models_lists_the_registry(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    from gm.registry import families

    if families():
        assert all(name in out for name in families())
    else:
        assert "no model families registered yet" in out


def test_prepare_and_inspect_outside_dvc(tmp_path, rng, capsys):
    for cls in ("x", "y"):
        for i in range(6):
            save(tmp_path / "data" / "toy" / cls / f"{i}.png", random_rgb(rng, 16))
    (tmp_path / "data" / "toy" / "y" / "readme.md").write_text("hi")
    params = {
        "datasets": {"toy": {"top_resolution": 16}},
        "pairs": {
            "toy_sr": {
                "kind": "super_resolution",
                "dataset": "toy",
                "resolution": 16,
                "scales": [2],
            }
        },
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    args = [
        "--params",
        str(tmp_path / "params.yaml"),
        "--data",
        str(tmp_path / "data"),
        "--out",
        str(tmp_path / "datasets"),
        "--quiet",
    ]
    assert main(["prepare", *args]) == 0
    assert (tmp_path / "datasets" / "pyramid" / "toy" / "16x16.parquet").is_file()
    assert (tmp_path / "datasets" / "pairs" / "toy_sr" / "x2.parquet").is_file()
    capsys.readouterr()
    assert main(["data", "inspect", str(tmp_path / "data" / "toy")]) == 0
    out = capsys.readouterr().out
    assert "12 image files in 2 classes" in out and "y/readme.md" in out
    assert main(["data", "inspect", str(tmp_path / "datasets" / "pyramid" / "toy")]) == 0
    out = capsys.readouterr().out
    assert "12 images" in out and "levels [4, 8, 16]" in out
    assert main(["prepare", "nope", *args]) == 2
    assert "no dataset or pairs entry named 'nope'" in capsys.readouterr().err


def test_missing_params_file_is_named(tmp_path, capsys):
    assert main(["prepare", "--params", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: cannot read params file" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "biggan"], "biggan: not a job of"),
        (["train", "cgan", "--set", "model.ngff=3"], "train.cgan.model.ngff: unknown key"),
        (["train", "cgan", "--set", "run.steps=many"], "train.cgan.run.steps: expected an integer"),
        (["train", "cgan", "--set", "steps"], "--set steps: expected KEY=VALUE"),
        (["train", "dcgan"], "dcgan: no dataset; add --set dataset=NAME"),
        (["train", "srgan"], "srgan: no paired dataset; add --set pairs=NAME"),
        (
            ["train", "srgan", "--set", "pairs=toy_sr"],
            "train_paired.srgan.model.vgg19_weights: content_loss 'vgg19' needs",
        ),
    ],
)
def test_train_rejects_bad_models_and_keys_before_any_work(tmp_path, capsys, argv, message):
    params = {
        "datasets": {"toy": {"top_resolution": 16}},
        "train": {"cgan": {"family": "cgan", "dataset": "toy"}},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "models"
    code = main([*argv, "--params", str(tmp_path / "params.yaml"), "--out", str(out)])
    assert code == 2 and message in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "runs").exists()


def test_exit_now_flushes_output_and_returns_the_code():
    """Stages end through exit_now (os._exit after flushing): the exit status and every line
    written, including buffered stdout and logging, reach the caller."""
    import subprocess
    import sys

    code = ("import logging, sys; from gm.cli import exit_now; print('out'); "
            "sys.stderr.write('err\\n'); logging.basicConfig(stream=sys.stdout); "
            "logging.warning('logged'); exit_now(3)")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 3 and r.stdout.split() == ["out", "WARNING:root:logged"]
    assert r.stderr.strip() == "err"
