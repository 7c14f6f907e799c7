"""The default raw data is byte-identical to what data.dvc records."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import yaml
from PIL import Image

from gm.data.sources import emoji_class, materialize

from .conftest import REPO


def run(cmd, cwd):
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)


def test_emoji_classes_follow_unicode_ranges():
    assert emoji_class((0x1F600,)) == "faces"  # grinning face
    assert emoji_class((0x1F436,)) == "animals_nature"  # dog face
    assert emoji_class((0x1F355,)) == "food"  # pizza
    assert emoji_class((0x1F680,)) == "travel_places"  # rocket
    assert emoji_class((0x1F1EB, 0x1F1F7)) == "flags"  # FR
    assert emoji_class((0x1F44D, 0x1F3FD)) == "people"  # thumbs up, medium skin tone
    assert emoji_class((0x2194,)) == "symbols"  # left right arrow
    assert emoji_class((0xE000,)) is None  # OpenMoji private-use extra


@pytest.fixture(scope="module")
def materialized(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    written = materialize(root / "data", progress=False)
    return root, written


def test_materialized_data_matches_data_dvc(materialized):
    root, written = materialized
    assert written == {"emoji": 4128, "digits": 1797, "photos": 12}
    run(["git", "init", "-q"], root)
    run(["dvc", "init", "-q"], root)
    run(["dvc", "add", "-q", "data"], root)
    ours = yaml.safe_load((root / "data.dvc").read_text())["outs"][0]
    recorded = yaml.safe_load((REPO / "data.dvc").read_text())["outs"][0]
    assert (ours["md5"], ours["nfiles"], ours["size"]) == (
        recorded["md5"],
        recorded["nfiles"],
        recorded["size"],
    )


def test_materialized_images(materialized):
    root, _ = materialized
    emoji = Image.open(root / "data" / "emoji" / "faces" / "1F600.png")
    assert emoji.size == (256, 256) and emoji.mode == "RGBA"
    alpha = np.asarray(emoji)[..., 3]
    assert alpha[0].max() == 0 and alpha[128, 128] == 255  # transparent border, inked centre
    digit = Image.open(root / "data" / "digits" / "0" / "0000.png")
    assert digit.size == (8, 8) and digit.mode == "L"
    assert len(list((root / "data" / "emoji").iterdir())) == 8


def test_existing_data_is_kept_unless_forced(tmp_path):
    (tmp_path / "data" / "digits").mkdir(parents=True)
    assert materialize(tmp_path / "data", only=["digits"], progress=False) == {"digits": None}
    assert materialize(tmp_path / "data", only=["digits"], force=True, progress=False) == {
        "digits": 1797
    }
