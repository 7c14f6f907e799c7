"""`dvc repro` of the data stages in a temporary git + DVC repository (real git, real DVC)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from gm.config import yaml_load

from .conftest import REPO, random_rgb, registered_checkpoints, save

pytestmark = pytest.mark.slow


def sh(cmd, cwd, check=True):
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


PARAMS = {
    "datasets": {
        "toy": {"top_resolution": 16},
        "gray": {"top_resolution": 8, "channels": 1, "undersize": "upscale"},
    },
    "pairs": {
        "toy_sr": {
            "kind": "super_resolution",
            "dataset": "toy",
            "resolution": 16,
            "scales": [2, 4],
        },
        "toy_lineart": {"kind": "translation", "dataset": "toy", "resolution": 16},
        "gray_labels": {"kind": "conditional", "dataset": "gray", "resolution": 8},
    },
    "train": {
        "toy_gan": {
            "family": "cgan",
            "dataset": "toy",
            "resolution": 8,
            "model": {"z_dim": 8, "ngf": 8, "ndf": 8, "embed_dim": 4},
            "run": {"steps": 4, "batch_size": 4, "checkpoint_every": 2},
        }
    },
    "train_paired": {
        "toy_sr_gan": {
            "family": "srgan",
            "pairs": "toy_sr",
            "model": {
                "scale": 4,
                "width": 8,
                "blocks": 2,
                "ndf": 4,
                "d_dense": 8,
                "content_loss": "pixel",
                "pretrain_steps": 2,
            },  # fmt: skip
            "run": {"steps": 4, "batch_size": 4, "checkpoint_every": 2},
        }
    },
    "evaluate": {
        "classifier": {"width": 4, "features": 8, "steps": 10, "batch_size": 8},
        "num_samples": 12,
        "min_images": 2,  # toy data: the stages' mechanics, not numbers to compare
    },
    "tune": {},  # dvc.yaml's foreach stages need every section they iterate, even empty
    "train_codec": {},
    "rd": {},
    # mechanics only: 12 samples leave 2 held out (min_images 2)
    "detect": {
        "toy": {
            "dataset": "toy",
            "steps": 4,
            "batch_size": 4,
            "min_images": 2,
            "bootstrap": 0,
            "leave_one_out": False,
        }
    },  # fmt: skip
}


@pytest.fixture
def repo(tmp_path, rng):
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy(REPO / "dvc.yaml", root)
    shutil.copytree(REPO / "gm", root / "gm", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(
        REPO / "pipelines", root / "pipelines", ignore=shutil.ignore_patterns("__pycache__")
    )
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    for cls in ("a", "b", "c"):
        for i in range(12):
            save(root / "data" / "toy" / cls / f"{i}.png", random_rgb(rng, 20))
            save(root / "data" / "gray" / cls / f"{i}.png", random_rgb(rng, 6)[..., 0])
    sh(["git", "init", "-q"], root)
    sh(["dvc", "init", "-q"], root)
    sh(["dvc", "config", "core.analytics", "false"], root)
    shutil.copytree(REPO / ".dvc/html", root / ".dvc/html")  # the offline plots page
    sh(["dvc", "config", "plots.html_template", "html/offline.html"], root)
    sh(["dvc", "add", "-q", "data"], root)
    sh(["git", "add", "-A"], root)
    sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], root)
    return root


# every stage of the pipeline above but the two trainings
DATA_AND_EVAL = ["prepare@toy", "prepare@gray", "pairs@toy_sr", "pairs@toy_lineart",
                 "pairs@gray_labels", "classifier@toy", "classifier@gray", "evaluate@toy_gan",
                 "detect@toy", "summary"]  # fmt: skip


def ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


# `make repro`'s command: one local Ray for every stage of the run (each training stage
# attaches instead of starting its own, about 8 s each here) and one fork server (each stage
# skips importing torch, Ray and MLflow). The plain `dvc repro` path, a stage's own Ray and
# process, is the interruption test's and the walkthrough's.
WITH_RAY = ["gm", "with-ray", "--"]


def test_repro_builds_everything_then_does_nothing(repo):
    r = sh([*WITH_RAY, "dvc", "repro"], repo)
    assert ran(r.stdout) == {*DATA_AND_EVAL, "train@toy_gan", "train_paired@toy_sr_gan"}
    for f in (
        "datasets/pyramid/toy/16x16.parquet",
        "datasets/pyramid/gray/4x4.parquet",
        "datasets/pairs/toy_sr/x4.parquet",
        "datasets/pairs/toy_lineart/unpaired.parquet",
        "datasets/pairs/gray_labels/pairs.parquet",
        "models/toy_gan/checkpoint.pt",
        "models/toy_gan/samples.png",
        "models/toy_sr_gan/checkpoint.pt",
        "models/toy_sr_gan/samples.png",
        "models/classifiers/toy/classifier.pt",
        "reports/eval/toy_gan.json",
        "samples/toy/toy_gan.parquet",
        "models/detectors/toy/detector.pt",
        "reports/detect/toy.json",
        "reports/detect/toy.png",
        "reports/summary.md",
    ):
        assert (repo / f).is_file(), f
    # DVC's .gitignore beside each file output survives the stages: no output shows in git
    status = sh(["git", "status", "--porcelain", "--untracked-files=all"], repo).stdout
    outs = ("models/", "datasets/", "samples/")
    outputs = [x for x in status.splitlines() if x[3:].startswith(outs)]
    assert not [x for x in outputs if x.endswith((".pt", ".png", ".parquet"))], outputs
    assert not [x for x in outputs if x.startswith(" D")], outputs  # no .gitignore deleted
    metrics = json.loads(sh(["dvc", "metrics", "show", "--json"], repo).stdout)
    assert metrics[""]["data"]["models/toy_gan/metrics.json"]["data"]["step"] == 4
    evaluated = metrics[""]["data"]["reports/eval/toy_gan.json"]["data"]
    assert evaluated["fid"] > 0 and "fid_baseline" in evaluated
    summary = (repo / "reports/summary.md").read_text()
    assert "| toy | 1 | toy_gan | cgan | 4 |" in summary
    detected = metrics[""]["data"]["reports/detect/toy.json"]["data"]["models"]["toy_gan"]
    assert 0 <= detected["auc"] <= 1
    assert f"| toy | toy_gan | cgan | {detected['auc']:.3f}" in summary
    # dvc plots: a chart per curve of each training, a point per logged step, and no warning
    r = sh(["dvc", "plots", "show", "--json"], repo)
    assert "failed to load" not in r.stdout + r.stderr
    shown = json.loads(r.stdout)
    assert not shown.get("errors"), shown.get("errors")
    shown = shown["data"]
    for f in ("models/toy_gan/plots/loss_G.csv", "models/toy_gan/plots/kid.csv",
              "models/toy_sr_gan/plots/psnr.csv"):  # fmt: skip
        assert f in shown, sorted(shown)
    assert len((repo / "models/toy_gan/plots/loss_D.csv").read_text().splitlines()) == 1 + 4
    sr = metrics[""]["data"]["models/toy_sr_gan/metrics.json"]["data"]  # scored on test pairs
    assert sr["step"] == 4 and sr["psnr"] > 0 and sr["psnr_bicubic"] > 0
    client = MlflowClient(f"sqlite:///{repo}/mlflow.db")
    runs = {r.data.tags["gm.job"]: r for r in client.search_runs(["0", "1"])}
    assert runs["toy_sr_gan"].data.tags["dvc.stage"] == "train_paired@toy_sr_gan"
    run = runs["toy_gan"]
    assert run.data.tags["dvc.stage"] == "train@toy_gan" and "dvc.dep.gm" in run.data.tags
    # dvc metrics and the MLflow run agree
    assert run.data.metrics["eval/fid"] == pytest.approx(evaluated["fid"])
    assert run.data.tags["eval.extractor"] == "domain-classifier"
    # The evaluate stage registered the generator and made it the champion.
    champ = client.get_model_version_by_alias("gm-toy_gan", "champion")
    assert champ.run_id == run.info.run_id
    assert float(champ.tags["eval.fid"]) == pytest.approx(evaluated["fid"])
    assert (repo / "runs").is_dir()  # Ray's run storage, outside every DVC output
    t = time.perf_counter()
    r = sh(["dvc", "repro"], repo)
    assert ran(r.stdout) == set() and "up to date" in r.stdout
    assert time.perf_counter() - t < 30  # generous: the target is < 5 s (see bench)
    assert "up to date" in sh(["dvc", "status"], repo).stdout
    lock = (repo / "dvc.lock").read_text()
    # A param of one dataset reruns that dataset and what depends on it, nothing else.
    params = yaml_load((repo / "params.yaml").read_text())
    params["datasets"]["gray"]["resample"] = "bilinear"
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    assert ran(sh([*WITH_RAY, "dvc", "repro"], repo).stdout) == {
        "prepare@gray",
        "pairs@gray_labels",
        "classifier@gray",
    }

    # Outputs are deterministic: rebuilding gives the same dvc.lock. Every stage but the two
    # trainings is rebuilt (training's determinism, bit-identical weights from the same params,
    # is test_audit's reproduction and test_ray_train's streaming-equals-in-memory).
    params["datasets"]["gray"].pop("resample")
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    rebuilt = ran(sh([*WITH_RAY, "dvc", "repro", "--force", "--single-item", *DATA_AND_EVAL],
                     repo).stdout)  # fmt: skip
    assert rebuilt == set(DATA_AND_EVAL)
    assert (repo / "dvc.lock").read_text() == lock
    # A train param reruns that training only; a bigger budget continues the finished run.
    params["train"]["toy_gan"]["run"]["steps"] = 6
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    assert ran(sh([*WITH_RAY, "dvc", "repro"], repo).stdout) == {
        "train@toy_gan",
        "evaluate@toy_gan",
        "detect@toy",
        "summary",
    }
    metrics = json.loads((repo / "models/toy_gan/metrics.json").read_text())
    assert metrics["step"] == 6 and metrics["resumed_from"] == 4


def test_bad_params_fail_the_stage_cleanly(repo):
    params = yaml_load((repo / "params.yaml").read_text())
    params["datasets"]["toy"]["top_resolution"] = 24
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    r = sh(["dvc", "repro", "prepare@toy"], repo, check=False)
    assert r.returncode != 0
    assert "datasets.toy.top_resolution: 24 is not a power of two" in r.stderr + r.stdout
    assert not (repo / "datasets" / "pyramid" / "toy").exists()
    assert not [p for p in repo.rglob("*.tmp-*")]


def test_verify_names_modified_raw_data(repo):
    assert "up to date" in sh(["gm", "data", "verify"], repo).stdout
    save(repo / "data" / "toy" / "a" / "0.png", random_rgb(np.random.default_rng(1), 20))
    r = sh(["gm", "data", "verify"], repo, check=False)
    assert r.returncode == 2
    assert "data is modified with respect to data.dvc" in r.stderr
    assert "dvc add data" in r.stderr


def cache_is_sound(repo) -> int:
    """Every file object in the DVC cache hashes to its own name; returns how many."""
    import hashlib

    n = 0
    for f in (repo / ".dvc/cache/files/md5").glob("*/*"):
        if f.name.endswith(".dir"):
            json.loads(f.read_text())  # a directory listing: valid JSON
        else:
            assert hashlib.md5(f.read_bytes()).hexdigest() == f.parent.name + f.name, f
        n += 1
    return n


def interrupt_training(repo, sig, seen: frozenset = frozenset()):
    """Start `dvc repro train@toy_gan`, wait until Ray Train has registered a checkpoint not
    in ``seen``, and send ``sig`` to the whole process group (DVC, the stage, its Ray);
    (exit code, registered checkpoints)."""
    import os
    import signal

    def checkpoints():
        return registered_checkpoints(repo.glob("runs/toy_gan-*"))

    proc = subprocess.Popen(
        ["dvc", "repro", "train@toy_gan"],
        cwd=repo,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not checkpoints() - seen:
        assert proc.poll() is None, "dvc repro ended before the interruption"
        assert time.monotonic() < deadline, "no new checkpoint within 300 s"
        time.sleep(0.2)
    os.killpg(proc.pid, sig)
    if sig == signal.SIGINT:  # Ctrl-C: DVC and the stage stop on their own
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(2)  # let a SIGKILLed Ray's leftovers exit
    return proc.returncode, checkpoints()


def test_repro_interrupted_by_sigint_then_sigkill_resumes_from_its_checkpoint(repo):
    import signal

    params = yaml_load((repo / "params.yaml").read_text())
    run = {"steps": 240, "batch_size": 4, "checkpoint_every": 20}
    params["train"]["toy_gan"]["run"] = run
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    code, seen = interrupt_training(repo, signal.SIGINT)
    assert code != 0 and seen
    assert not (repo / "models/toy_gan/checkpoint.pt").exists()  # no output of a partial stage
    assert "train@toy_gan" in sh(["dvc", "status"], repo).stdout
    assert cache_is_sound(repo) > 0

    code, seen_again = interrupt_training(repo, signal.SIGKILL, seen)
    assert code == -signal.SIGKILL and seen_again - seen  # it went on, then died again
    assert not (repo / "models/toy_gan/checkpoint.pt").exists()
    cache_is_sound(repo)

    r = sh(["dvc", "repro", "train@toy_gan"], repo)
    assert "Running stage 'train@toy_gan'" in r.stdout
    metrics = json.loads((repo / "models/toy_gan/metrics.json").read_text())
    # Resumed from a checkpoint the SIGKILLed run reported (itself resumed from one the
    # SIGINTed run reported, step 20 or later), not from scratch.
    assert metrics["step"] == 240 and metrics["resumed_from"] >= 40
    assert "train@toy_gan" not in sh(["dvc", "status"], repo).stdout
    assert cache_is_sound(repo) > 0
    sh(["dvc", "checkout", "--force", "train@toy_gan"], repo)  # the cache restores them
    assert json.loads((repo / "models/toy_gan/metrics.json").read_text())["step"] == 240


@pytest.mark.slow
def test_your_own_data_walkthrough_builds_just_that_chain(repo, rng):
    # The README's "Your own data", followed literally on a small generated folder: a folder
    # with a subfolder per class, a datasets entry, a training job, `dvc add data`, then
    # `dvc repro evaluate@<job>`, which builds that chain and nothing else.
    for cls in ("circles", "squares"):
        for i in range(15):
            save(repo / "data" / "mine" / cls / f"{i:03d}.png", random_rgb(rng, 24))
    r = sh(["gm", "data", "inspect", "data/mine"], repo, check=False)
    assert r.returncode == 0 and "circles" in r.stdout, r.stdout + r.stderr
    params = yaml_load((repo / "params.yaml").read_text())
    params["datasets"]["mine"] = {"top_resolution": 16, "channels": 3, "fit": "center_crop"}
    params["train"]["mine_gan"] = {
        "family": "cgan", "dataset": "mine",
        "model": {"z_dim": 8, "ngf": 8, "ndf": 8, "embed_dim": 4},
        "run": {"steps": 4, "batch_size": 4, "checkpoint_every": 2},
    }  # fmt: skip
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    sh(["dvc", "add", "-q", "data"], repo)
    r = sh(["dvc", "repro", "evaluate@mine_gan"], repo)
    assert ran(r.stdout) == {"prepare@mine", "classifier@mine", "train@mine_gan",
                             "evaluate@mine_gan"}, r.stdout  # fmt: skip
    for f in ("models/mine_gan/checkpoint.pt", "models/mine_gan/samples.png",
              "reports/eval/mine_gan.json", "models/classifiers/mine/classifier.pt"):  # fmt: skip
        assert (repo / f).is_file(), f
    report = json.loads((repo / "reports/eval/mine_gan.json").read_text())
    assert report["dataset"] == "mine" and "fid" in report
    status = sh(["dvc", "status", "evaluate@mine_gan"], repo).stdout
    assert "up to date" in status, status
