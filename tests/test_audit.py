"""Audit and registry: `gm runs`, `gm audit`, the champion alias and `gm sample`, against real
MLflow stores (the default SQLite file, a loopback `mlflow server`), git and DVC."""

from __future__ import annotations

import json
import subprocess
import time

import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient
from PIL import Image

from gm import tracking
from gm.audit import _set_value, audit_run, job_params, render_audit
from gm.cli import main
from gm.config import yaml_load
from gm.sample import Generator, load_generator, sample
from gm.train.checkpoint import save_checkpoint

from .conftest import BIN, chromium, dump_dom, free_port, git
from .test_models_contract import INFO, TINY, make


def checkpoint(tmp_path, name, seed=0):
    trainer, cfg = make(name, seed=seed)
    path = tmp_path / f"{name}-{seed}.pt"
    save_checkpoint(path, name, cfg, INFO, trainer.state_dict())
    return path, trainer


def read_png(path):
    return np.asarray(Image.open(path))


# --- gm sample ---------------------------------------------------------------------------


def test_sample_grid_from_a_checkpoint_is_seeded_and_labels_are_checked(tmp_path, capsys):
    ckpt, _ = checkpoint(tmp_path, "cgan")
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    assert main(["sample", str(ckpt), "--n", "6", "--out", str(a)]) == 0
    assert main(["sample", str(ckpt), "--n", "6", "--out", str(b)]) == 0
    assert main(["sample", str(ckpt), "--n", "6", "--seed", "1", "--out", str(c)]) == 0
    grid = read_png(a)
    assert grid.shape == (2 * 18 + 2, 3 * 18 + 2, 3)  # 6 images of 16², 3 a row, 2 px padding
    assert np.array_equal(grid, read_png(b)) and not np.array_equal(grid, read_png(c))
    capsys.readouterr()
    bad = tmp_path / "bad.png"
    assert main(["sample", str(ckpt), "--label", "3", "--out", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "--label 3: out of range" in err and "3 classes (0–2)" in err
    assert not bad.exists()
    g = load_generator(str(ckpt))
    zero, one = sample(g, 4, label=0), sample(g, 4, label=1)
    assert zero.shape == (4, 3, 16, 16) and not torch.equal(zero, one)  # the label matters
    assert main(["sample", str(ckpt), "--out", str(tmp_path / "grid.jpg")]) == 2
    assert "PNG" in capsys.readouterr().err


def test_interpolation_strips_walk_the_sphere_between_two_samples(tmp_path, capsys):
    """`gm sample --interpolate S`: each row starts and ends at two latents of the seed and
    walks between them on the sphere, one class per row."""
    from gm.sample import interpolate, slerp

    a, b = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    path = slerp(a, b, torch.linspace(0, 1, 5))
    assert torch.allclose(path[0], a, atol=1e-6) and torch.allclose(path[-1], b, atol=1e-6)
    norms = path.norm(dim=1)  # on the great circle: norms between the ends', no dip inside
    assert norms.min() >= min(a.norm(), b.norm()) - 1e-5
    assert (path[2].norm() - (a + b).norm() / 2) > 0.05 * a.norm()  # a line would dip here
    ckpt, _ = checkpoint(tmp_path, "cgan")
    g = load_generator(str(ckpt))
    strips = interpolate(g, 3, 4, seed=5)
    assert strips.shape == (12, 3, 16, 16)
    again = interpolate(g, 3, 4, seed=5)
    assert torch.equal(strips, again) and not torch.equal(strips[0], strips[3])
    ends = torch.randn(3, 2, *g.latent_shape, generator=torch.Generator().manual_seed(5))
    first = g.fn(ends[1, :1], torch.tensor([1])).clamp(-1, 1)  # row 1 starts at its latent
    assert torch.allclose(strips[4:5], first, atol=1e-5)
    out = tmp_path / "strips.png"
    assert main(["sample", str(ckpt), "--n", "3", "--interpolate", "4", "--out", str(out)]) == 0
    assert read_png(out).shape == (3 * 18 + 2, 4 * 18 + 2, 3)  # a row per strip
    assert "3 interpolation strips of 4 images" in capsys.readouterr().out
    assert main(["sample", str(ckpt), "--interpolate", "1", "--out", str(out)]) == 2
    assert "--interpolate 1: a strip needs >= 2 images" in capsys.readouterr().err


def test_unconditional_models_refuse_a_label_and_truncation_zero_is_the_mean(tmp_path, capsys):
    ckpt, _ = checkpoint(tmp_path, "dcgan")
    assert main(["sample", str(ckpt), "--label", "0", "--out", str(tmp_path / "x.png")]) == 2
    assert "is unconditional" in capsys.readouterr().err
    g = load_generator(str(ckpt))
    full, mean = sample(g, 8, truncation=1.0), sample(g, 8, truncation=0.0)
    assert full.std(0).mean() > 0  # an untrained generator: small but distinct samples
    assert torch.allclose(mean, mean[:1].expand_as(mean))  # z·0: one image, eight times
    half = sample(g, 8, truncation=0.5)
    assert mean.std(0).mean() < half.std(0).mean() < full.std(0).mean()
    with pytest.raises(Exception, match="--truncation 1.5: must be in"):
        sample(g, 2, truncation=1.5)


def test_stylegan_checkpoint_truncates_w(tmp_path):
    ckpt, trainer = checkpoint(tmp_path, "stylegan")
    g = load_generator(str(ckpt), truncation=0.0)
    assert g.truncates_w
    at_mean = sample(g, 6, truncation=0.0)  # z is not scaled: ψ acts on w inside the network
    spread = sample(load_generator(str(ckpt), truncation=1.0), 6)
    assert at_mean.std(0).mean() < 0.1 * spread.std(0).mean()


# --- the model registry --------------------------------------------------------------------


def logged_run(root, job, trainer):
    """A real MLflow run of ``root``'s default store holding ``trainer``'s generator."""
    from gm.train.job import log_models

    handle = tracking.RunHandle.open(root, job, None, {"family": "cgan"}, {"gm.job": job})
    log_models(handle, trainer, {"resolution": 16, "channels": 3, "num_classes": 3})
    handle.finish()
    return handle.run_id


def test_champion_alias_moves_only_when_the_metric_improves(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".git").mkdir()  # repo_root() anchors the store here
    t1, _ = make("cgan", seed=0)
    t2, _ = make("cgan", seed=1)
    run1, run2 = logged_run(tmp_path, "toy", t1), logged_run(tmp_path, "toy", t2)
    client = MlflowClient(tracking.tracking_uri(tmp_path))

    r = tracking.register_champion(tmp_path, "toy", {"mlflow_run_id": run1, "fid": 5.0, "step": 4})
    assert (r["model"], r["version"], r["champion"], r["previous"]) == ("gm-toy", 1, True, None)
    r = tracking.register_champion(tmp_path, "toy", {"mlflow_run_id": run2, "fid": 7.0, "step": 4})
    assert (r["version"], r["champion"], r["previous"]) == (2, False, 1)
    assert int(client.get_model_version_by_alias("gm-toy", "champion").version) == 1
    # Evaluating the same run again finds its version; a better value moves the alias.
    r = tracking.register_champion(tmp_path, "toy", {"mlflow_run_id": run2, "fid": 3.0, "step": 6})
    assert (r["version"], r["champion"], r["previous"]) == (2, True, 1)
    assert len(client.search_model_versions("name = 'gm-toy'")) == 2
    champ = client.get_model_version_by_alias("gm-toy", "champion")
    assert int(champ.version) == 2 and champ.run_id == run2 and champ.tags["eval.fid"] == "3.0"
    # Higher is better for accuracy-like metrics.
    acc = {"mlflow_run_id": run1, "conditional_accuracy": 0.9, "step": 4}
    assert tracking.register_champion(tmp_path, "acc", acc, "conditional_accuracy")["champion"]
    acc2 = {"mlflow_run_id": run2, "conditional_accuracy": 0.5, "step": 4}
    assert not tracking.register_champion(tmp_path, "acc", acc2, "conditional_accuracy")["champion"]
    # With its 95 % interval, a better value moves the alias only if the whole interval wins.
    assert tracking.register_champion(tmp_path, "ci", {"mlflow_run_id": run1, "fid": 5.0,
                                                       "step": 4})["champion"]  # fmt: skip
    noisy = {"mlflow_run_id": run2, "fid": 4.0, "fid_ci_low": 3.0, "fid_ci_high": 5.5, "step": 4}
    r = tracking.register_champion(tmp_path, "ci", noisy)
    assert (r["champion"], r["previous"]) == (False, 1)  # 4.0 < 5.0, but within the noise
    clear = noisy | {"fid_ci_low": 3.5, "fid_ci_high": 4.8}
    assert tracking.register_champion(tmp_path, "ci", clear)["champion"]
    assert int(client.get_model_version_by_alias("gm-ci", "champion").version) == 2
    # A run without a generator, or without the metric, registers nothing.
    bare = tracking.RunHandle.open(tmp_path, "bare", None, {}, {}).run_id
    assert tracking.register_champion(tmp_path, "bare", {"mlflow_run_id": bare, "fid": 1.0,
                                                         "step": 1}) is None  # fmt: skip
    assert tracking.register_champion(tmp_path, "toy", {"mlflow_run_id": run1, "step": 1}) is None

    # `gm sample` from the registered champion: the exported graph of run 2's generator.
    out = tmp_path / "champ.png"
    assert main(["sample", "models:/gm-toy@champion", "--n", "4", "--out", str(out)]) == 0
    assert "models:/gm-toy@champion (cgan)" in capsys.readouterr().out
    assert read_png(out).shape == (2 * 18 + 2, 2 * 18 + 2, 3)
    exported = sample(load_generator("models:/gm-toy@champion"), 4, seed=3)
    for trainer, expect in ((t2, True), (t1, False)):
        eager = Generator(trainer.model.generator(trainer.sampling_nets()).eval(), (8,), 3,
                          True, "cgan", "eager")  # fmt: skip
        assert torch.allclose(exported, sample(eager, 4, seed=3), atol=1e-5) is expect
    assert main(["sample", "models:/gm-toy@nobody", "--out", str(tmp_path / "n.png")]) == 2
    assert "cannot read the MLflow model" in capsys.readouterr().err


# --- audit helpers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, value",
    [("500", "500"), ("0.0002", "0.0002"), ("True", "true"), ("[0.5, 0.999]", "[0.5, 0.999]"),
     ("digits", "digits"), ("None", "null"), ("", "null")],
)  # fmt: skip
def test_set_values_parse_back_to_the_logged_value(text, value):
    assert _set_value(text) == value


PARAMS = {
    "datasets": {"toy": {"top_resolution": 16}},
    "train": {
        "toy": {
            "family": "dcgan",
            "dataset": "toy",
            "model": TINY["dcgan"],
            "run": {"steps": 2, "batch_size": 4, "checkpoint_every": 2},
        }
    },
}


def test_job_params_are_what_a_run_logs(tmp_path):
    section, flat = job_params(PARAMS, "toy", "params.yaml")
    assert section == "train" and flat["family"] == "dcgan" and flat["run.steps"] == "2"
    assert flat["model.z_dim"] == "8" and "model.ngf" in flat and "data.resolution" not in flat
    with pytest.raises(Exception, match="no training job 'nope'"):
        job_params(PARAMS, "nope", "params.yaml")


# --- gm audit on real trainings --------------------------------------------------------------


def audit_project(project):
    """``project`` with real raw data under DVC, a params.yaml job `toy` and a DVC stage
    `train` that trains it."""
    (project / "data").mkdir()
    (project / "data/readme.txt").write_text("raw data\n")
    subprocess.run(["dvc", "add", "-q", "data"], cwd=project, check=True)  # a real data.dvc
    (project / "params.yaml").write_text(yaml.safe_dump(PARAMS, sort_keys=False))
    stage = {
        "cmd": "python -m pipelines.train --name toy --dataset datasets/pyramid/toy "
        "--out models/toy",
        "deps": ["datasets/pyramid/toy", "notes.txt"],
        "params": ["train.toy"],
        "outs": ["models/toy"],
    }
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": stage}}))
    git(project, "add", "-A")
    git(project, "commit", "-qm", "a training stage")


def gm(project, *args, env=None):
    return subprocess.run(
        [BIN / "gm", *args], cwd=project, capture_output=True, text=True, env=env, timeout=600
    )


def newest_run(project, uri=None):
    client = MlflowClient(uri or f"sqlite:///{project}/mlflow.db")
    exp = client.get_experiment_by_name("gm")
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])[0]


@pytest.mark.slow
def test_audit_matches_then_names_the_difference_and_its_commands_reproduce_the_run(
    project, monkeypatch, tmp_path
):
    import os

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    audit_project(project)
    subprocess.run(["dvc", "repro", "-q"], cwd=project, check=True, env=env, timeout=600)
    git(project, "add", "dvc.lock")
    git(project, "commit", "-qm", "lock")
    run1 = newest_run(project)
    t = run1.data.tags
    assert t["gm.section"] == "train" and t["gm.out"] == "models/toy"
    assert t["gm.checkpoint.sha256"] and t["dvc.stage"] == "train"

    # dvc.lock was committed after the run: HEAD moved on, but not in anything the stage reads.
    r = gm(project, "audit", run1.info.run_id, "--check", env=env)
    assert r.returncode == 0 and "the workspace matches this run" in r.stdout, r.stdout
    a = audit_run(project, run1.info.run_id)
    assert {c.what for c in a.checks if c.ok} >= {
        "data.dvc", "dep datasets/pyramid/toy", "dep notes.txt",
        "output models/toy/checkpoint.pt", "params.yaml train.toy",
    }  # fmt: skip
    assert "nothing the stage depends on changed since" in a.checks[0].what
    assert a.commands[-1] == "dvc repro --force --single-item train"
    assert "final/checkpoint.pt" in a.artifacts and "params" in render_audit(a)

    # A run made with `dvc exp run -S`: its params differ from its commit's params.yaml.
    exp = ["dvc", "exp", "run", "-q", "-S", "train.toy.run.batch_size=2"]
    r = subprocess.run(exp, cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    run2 = newest_run(project)
    assert run2.data.params["run.batch_size"] == "2" and run2.info.run_id != run1.info.run_id
    a2 = audit_run(project, run2.info.run_id)
    assert a2.matches, render_audit(a2)  # the workspace holds the experiment
    assert a2.commands == [
        f"git checkout {run2.data.tags['git.commit']}",
        "dvc checkout",
        "dvc exp run --force --single-item train -S train.toy.run.batch_size=2",
    ]
    assert any("uncommitted changes" in n for n in a2.notes)
    (project / "notes.txt").write_text("edited\n")
    a3 = audit_run(project, run2.info.run_id)
    assert "dep notes.txt" in a3.differing() and not a3.matches

    # Following the printed commands in the workspace (with no Ray run state to resume from)
    # retrains the same params, and CPU training is deterministic: the same weights.
    git(project, "checkout", "--", ".")
    subprocess.run(["rm", "-rf", "runs", "models"], cwd=project, check=True)
    for cmd in a2.commands:
        done = subprocess.run(cmd, shell=True, cwd=project, env=env, capture_output=True,
                              text=True, timeout=600)  # fmt: skip
        assert done.returncode == 0, (cmd, done.stderr)
    run3 = newest_run(project)
    assert run3.info.run_id != run2.info.run_id
    assert {k: v for k, v in run3.data.params.items() if not k.startswith("run.init")} == {
        k: v for k, v in run2.data.params.items() if not k.startswith("run.init")
    }
    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    weights = []
    for r in (run2, run3):  # the files differ in their timings; the weights must not
        path = client.download_artifacts(r.info.run_id, "final/checkpoint.pt", str(tmp_path))
        weights.append(torch.load(path, weights_only=True)["trainer"]["model"])
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])

    # `gm runs` lists all three; --compare shows what differs between run 1 and 2.
    r = gm(project, "runs", env=env)
    assert r.returncode == 0 and r.stdout.count("\n") == 4, r.stdout
    assert run1.info.run_id[:12] in r.stdout and "run.batch_size" in r.stdout.splitlines()[0]
    r = gm(project, "runs", "--compare", run1.info.run_id, run2.info.run_id, env=env)
    assert "param run.batch_size  4  2" in r.stdout
    r = gm(project, "runs", "--json", "--filter", "params.`run.batch_size` = '4'", env=env)
    assert [row["run_id"] for row in json.loads(r.stdout)] == [run1.info.run_id]
    r = gm(project, "runs", "--filter", "params.nope ==", env=env)
    assert r.returncode == 2 and "--filter" in r.stderr


@pytest.mark.slow
def test_audit_and_runs_against_an_mlflow_server(ray_local, project, mlflow_server, monkeypatch):
    from gm.train.job import TrainConfig, run_job
    from gm.train.ray_train import RunSettings

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    audit_project(project)
    run = RunSettings(steps=2, batch_size=4, checkpoint_every=2)
    cfg = TrainConfig(family="dcgan", dataset="toy", model=TINY["dcgan"], run=run)
    ds = project / "datasets/pyramid/toy"
    m = run_job("toy", cfg, ds, project / "models/toy", project, stage="train", progress=False)
    a = audit_run(project, m["mlflow_run_id"])
    assert a.uri == mlflow_server and a.matches, render_audit(a)
    assert "output models/toy/checkpoint.pt" in {c.what for c in a.checks if c.ok}
    r = gm(project, "runs")
    assert r.returncode == 0 and m["mlflow_run_id"][:12] in r.stdout
    assert not (project / "mlflow.db").exists()
    r = gm(project, "audit", "0123456789abcdef")
    assert r.returncode == 2 and "run 0123456789abcdef: not found" in r.stderr


@pytest.mark.slow
def test_a_run_continued_with_more_steps_is_audited_as_its_final_state(
    ray_local, project, monkeypatch
):
    # `gm train toy --set run.steps=2`, then 3: one run, holding the 3-step checkpoint; its
    # record says 3 and audit reproduces 3 (it said 2, the first launch's value).
    from gm.train.job import TrainConfig, run_job
    from gm.train.ray_train import RunSettings

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    audit_project(project)  # params.yaml's job has run.steps 2
    ds, out = project / "datasets/pyramid/toy", project / "models/toy"
    ids = []
    for steps in (2, 3):
        run = RunSettings(steps=steps, batch_size=4, checkpoint_every=2)
        cfg = TrainConfig(family="dcgan", dataset="toy", model=TINY["dcgan"], run=run)
        m = run_job("toy", cfg, ds, out, project, progress=False)
        ids.append(m["mlflow_run_id"])
    assert ids[0] == ids[1] and m["step"] == 3
    a = audit_run(project, ids[1][:12])
    assert a.params["run.steps"] == "3" and a.tags["gm.launches"] == "2"
    assert a.commands[-1] == "gm train toy --set run.steps=3", a.commands
    assert "output models/toy/checkpoint.pt" in {c.what for c in a.checks if c.ok}
    r = gm(project, "runs", "--json")
    assert json.loads(r.stdout)[0]["params"]["run.steps"] == "3"


def browse_until(url: str, tmp_path, until: str, timeout: float = 90.0) -> dict:
    """Open ``url`` in headless Chromium and poll the JavaScript expression ``until`` (it
    returns a JSON-able object with a truthy ``done``) in real time, through the DevTools
    protocol. ``--dump-dom`` runs on virtual time, under which MLflow's metric charts never ask
    for their data (no get-history request reaches the server: they stay spinners)."""
    import asyncio

    import aiohttp

    port = free_port()
    proc = subprocess.Popen(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         f"--user-data-dir={tmp_path / 'chromium-cdp'}", f"--remote-debugging-port={port}",
         "--window-size=1400,1200", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip

    async def run() -> dict:
        async with aiohttp.ClientSession() as session:
            for _ in range(150):
                try:
                    async with session.get(f"http://127.0.0.1:{port}/json") as r:
                        tabs = await r.json()
                    break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.2)
            page = next(t for t in tabs if t["type"] == "page")
            async with session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                ids = iter(range(1, 10**6))

                async def call(method: str, **params):
                    i = next(ids)
                    await ws.send_json({"id": i, "method": method, "params": params})
                    async for msg in ws:
                        data = json.loads(msg.data)
                        if data.get("id") == i:
                            return data.get("result", {})
                    raise RuntimeError("the browser closed the connection")

                await call("Page.navigate", url=url)
                deadline = time.monotonic() + timeout
                while True:
                    r = await call("Runtime.evaluate", expression=f"JSON.stringify({until})")
                    found = json.loads(r.get("result", {}).get("value") or "{}")
                    if found.get("done") or time.monotonic() > deadline:
                        return found
                    await asyncio.sleep(0.5)

    try:
        return asyncio.run(run())
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
@pytest.mark.skipif(chromium() is None, reason="needs Debian's chromium (make test installs it)")
def test_the_mlflow_ui_shows_a_finished_run_its_metrics_and_its_sample_grid(
    ray_local, project, mlflow_server, monkeypatch, tmp_path
):
    from gm.train.job import TrainConfig, run_job
    from gm.train.ray_train import RunSettings

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    run = RunSettings(steps=2, batch_size=4, checkpoint_every=2)
    cfg = TrainConfig(family="dcgan", dataset="toy", model=TINY["dcgan"], run=run)
    ds = project / "datasets/pyramid/toy"
    m = run_job("browsed", cfg, ds, project / "models/toy", project, progress=False)
    run_id = m["mlflow_run_id"]
    exp = MlflowClient(mlflow_server).get_run(run_id).info.experiment_id

    page = dump_dom(f"{mlflow_server}/#/experiments/{exp}/runs/{run_id}", tmp_path)
    assert "browsed" in page  # the run's name
    assert "loss/D" in page and "loss/G" in page  # its metrics
    assert "FINISHED" in page.upper()
    grid = dump_dom(
        f"{mlflow_server}/#/experiments/{exp}/runs/{run_id}/artifacts/final/samples.png", tmp_path
    )
    assert "samples.png" in grid
    assert any("<img" in part and "samples.png" in part for part in grid.split(">"))
    # MLflow 3.17 opens an experiment on its GenAI overview (traces, token usage); the links gm
    # prints ask for model training, where the experiment's runs are listed.
    url = tracking.run_url(project, run_id)
    assert url == f"{mlflow_server}/#/experiments/{exp}/runs/{run_id}?{tracking.UI_WORKFLOW}"
    runs = dump_dom(f"{mlflow_server}/#/experiments/{exp}?{tracking.UI_WORKFLOW}", tmp_path)
    assert "browsed" in runs and "Token Usage" not in runs
    # The run's metric charts draw their curves (plotly), none left a loading spinner.
    charts = browse_until(
        f"{mlflow_server}/#/experiments/{exp}/runs/{run_id}/model-metrics?{tracking.UI_WORKFLOW}",
        tmp_path,
        # charts below the fold load when scrolled to: count the spinners on screen
        "((spin, plots) => ({spinners: spin, plots: plots, text: document.body.innerText,"
        " done: plots >= 2 && spin === 0}))([...document.querySelectorAll("
        "'.du-bois-light-spin-spinning')].filter(e => e.getBoundingClientRect().top <"
        " window.innerHeight).length, document.querySelectorAll('.js-plotly-plot').length)",
    )
    assert charts.get("done"), {k: v for k, v in charts.items() if k != "text"}
    assert "loss/D" in charts["text"] and "loss/G" in charts["text"]


# --- issue 19: continued runs, DVC overrides, short ids, DIFF values ---------------------------


def committed_params_project(tmp_path, params=PARAMS):
    """A git repository whose committed params.yaml is ``params``; returns (root, commit)."""
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git(root, "add", "-A")
    git(root, "commit", "-qm", "params")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                            text=True, check=True).stdout.strip()  # fmt: skip
    return root, commit


def job_run(root, job_entry, tags):
    """A run in the project's SQLite store whose params are what run_job logs for
    ``job_entry`` (a `train.toy` params.yaml entry)."""
    _, flat = job_params({"datasets": PARAMS["datasets"], "train": {"toy": job_entry}}, "toy",
                         "run")  # fmt: skip
    handle = tracking.RunHandle.open(root, "toy", None, flat, tags)
    return handle.run_id


def test_audit_prints_overrides_dvc_accepts_and_shows_the_values_that_differ(tmp_path):
    from dvc.utils.hydra import apply_overrides

    base = json.loads(json.dumps(PARAMS))
    base["evaluate"] = {"classifier": {"steps": 5, "weight_decay": 0.001}}
    root, commit = committed_params_project(tmp_path, base)
    entry = json.loads(json.dumps(base["train"]["toy"]))
    entry["run"]["batch_size"] = 2  # changed: in the commit's params.yaml
    entry["model"]["optim_g"] = {"lr": 0.0005}  # added: absent from it (DVC wants ++)
    upstream = {"set": {"evaluate.classifier.steps": 3, "evaluate.classifier.lr": 0.01},
                "removed": ["evaluate.classifier.weight_decay"]}  # fmt: skip
    tags = {"gm.job": "toy", "gm.section": "train", "git.commit": commit,
            "dvc.stage": "train@toy", "dvc.upstream_params": json.dumps(upstream)}  # fmt: skip
    run_id = job_run(root, entry, tags)
    a = audit_run(root, run_id)
    cmd = a.commands[-1]
    assert cmd.startswith("dvc exp run --force train@toy -S ")  # upstream: no --single-item
    sets = [x.split(" ", 1)[1] for x in shlex_split_pairs(cmd)]
    assert "train.toy.run.batch_size=2" in sets
    assert "++train.toy.model.optim_g.lr=0.0005" in sets
    assert "~evaluate.classifier.weight_decay" in sets and "evaluate.classifier.steps=3" in sets
    assert "++evaluate.classifier.lr=0.01" in sets
    # DVC's own code applies them to the commit's params.yaml and gets the run's values.
    target = tmp_path / "params.yaml"
    target.write_text(yaml.safe_dump(base, sort_keys=False))
    apply_overrides(target, sets)
    applied = yaml_load(target.read_text())
    _, want = job_params({"datasets": base["datasets"], "train": {"toy": entry}}, "toy", "run")
    assert job_params(applied, "toy", "applied")[1] == want
    assert applied["evaluate"]["classifier"] == {"steps": 3, "lr": 0.01}

    # The workspace still holds the commit's params: the DIFF lines name key and both values.
    text = render_audit(a)
    assert "DIFF params.yaml train.toy.run.batch_size  run 2  workspace 4" in text, text
    assert "run run" not in text and "workspace workspace" not in text
    assert "DIFF params.yaml train.toy.model.optim_g.lr  run 0.0005  workspace 0.0002" in text


def shlex_split_pairs(cmd: str) -> list[str]:
    """`-S X` pairs of a printed command, unquoted as a shell would."""
    import shlex

    words = shlex.split(cmd)
    return [f"{w} {v}" for w, v in zip(words, words[1:], strict=False) if w == "-S"]


@pytest.mark.parametrize(
    "value",
    [5, 0.0002, True, None, "digits", "a,b c", "true", "1e-3", "it's", [0.5, 0.999], ["x", "y,z"]],
)
def test_every_override_value_round_trips_through_dvcs_parser(tmp_path, value):
    from dvc.utils.hydra import apply_overrides

    from gm.audit import _flow, dvc_override

    path = tmp_path / "params.yaml"
    for params in ({"a": {"b": "old"}}, {"a": {}}):  # changed, then added
        path.write_text(yaml.safe_dump(params))
        apply_overrides(path, [dvc_override(params, "a.b", _flow(value))])
        assert yaml.safe_load(path.read_text()) == {"a": {"b": value}}


def test_a_continued_run_records_each_launch_and_audit_reproduces_the_final_state(tmp_path):
    from gm.errors import ConfigError
    from gm.tracking import effective_params
    from gm.train.job import BUDGET_PARAMS

    root, commit = committed_params_project(tmp_path)
    params = {"run.steps": "30", "model.ngf": "8"}
    first = tracking.RunHandle.open(root, "toy", None, params, {"git.commit": "a" * 40})
    rid = first.run_id
    again = tracking.RunHandle.open(root, "toy", rid, params | {"run.steps": "31"},
                                    {"git.commit": commit}, may_change=BUDGET_PARAMS)  # fmt: skip
    assert again.run_id == rid
    client = MlflowClient(tracking.tracking_uri(root))
    run = client.get_run(rid)
    t = run.data.tags
    assert run.data.params["run.steps"] == "30" and t["gm.param.run.steps"] == "31"
    assert effective_params(run)["run.steps"] == "31" and t["git.commit"] == commit
    assert t["gm.launches"] == "2"
    l1, l2 = json.loads(t["gm.launch.1"]), json.loads(t["gm.launch.2"])
    assert l1["git.commit"] == "a" * 40 and l1["params"] == {}
    assert l2["git.commit"] == commit and l2["params"] == {"run.steps": "31"}
    # A param outside the budget: refused, naming it, and the run is left as it was.
    client.set_terminated(rid, "FINISHED")
    with pytest.raises(ConfigError, match=r"train.toy: .*model.ngf '8' -> '16'"):
        tracking.RunHandle.open(root, "toy", rid, params | {"model.ngf": "16"}, {},
                                may_change=BUDGET_PARAMS, where="train.toy")  # fmt: skip
    run = client.get_run(rid)
    assert run.info.status == "FINISHED" and run.data.tags["gm.launches"] == "2"
    # Back to the logged budget: the override tag goes.
    tracking.RunHandle.open(root, "toy", rid, params, {}, may_change=BUDGET_PARAMS)
    assert "gm.param.run.steps" not in client.get_run(rid).data.tags


def test_short_run_ids_are_unique_prefixes(tmp_path, monkeypatch, capsys):
    from gm.audit import compare_runs

    root, commit = committed_params_project(tmp_path)
    ids = [job_run(root, PARAMS["train"]["toy"] | {"run": {"steps": i}}, {"gm.job": "toy"})
           for i in range(2, 20)]  # fmt: skip
    a = audit_run(root, ids[0][:12])
    assert a.run_id == ids[0]
    assert audit_run(root, ids[1][:6].upper()).run_id == ids[1]
    out = compare_runs(root, [ids[0][:12], ids[1][:12]])
    assert "param run.steps  2  3" in out
    firsts = [i[0] for i in ids]
    shared = next(c for c in firsts if firsts.count(c) > 1)  # 18 ids over 16 hex digits
    with pytest.raises(Exception, match=rf"run {shared}: ambiguous, {firsts.count(shared)} runs"):
        audit_run(root, shared)
    monkeypatch.chdir(root)
    assert main(["audit", ids[0][:12]]) == 0
    assert ids[0] in capsys.readouterr().out
    assert main(["audit", "fffffffffffffff0"]) == 2
    assert "not found" in capsys.readouterr().err


def test_upstream_param_changes_come_from_dvcs_graph(tmp_path):
    root = tmp_path / "dvcrepo"
    root.mkdir()
    git(root, "init", "-q")
    subprocess.run(["dvc", "init", "-q"], cwd=root, check=True)
    params = {"evaluate": {"classifier": {"epochs": 5, "lr": 0.1}}, "other": {"x": 1},
              "train": {"toy": {"run": {"steps": 2}}}}  # fmt: skip
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    stages = {
        "classifier": {"cmd": "echo c > clf.txt", "params": ["evaluate.classifier"],
                       "outs": ["clf.txt"]},
        "unrelated": {"cmd": "echo u > u.txt", "params": ["other"], "outs": ["u.txt"]},
        "train": {"cmd": "echo t", "deps": ["clf.txt"], "params": ["train.toy"]},
    }  # fmt: skip
    stages["classifier"]["deps"] = ["raw"]  # raw data tracked by a .dvc file, as data.dvc
    (root / "raw").mkdir()
    (root / "raw/a.txt").write_text("a")
    subprocess.run(["dvc", "add", "-q", "raw"], cwd=root, check=True)
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    git(root, "add", "-A")
    git(root, "commit", "-qm", "pipeline")
    assert tracking.upstream_param_changes(root, "train") == {}
    changed = json.loads(json.dumps(params))
    changed["evaluate"]["classifier"]["epochs"] = 3  # upstream of train
    del changed["evaluate"]["classifier"]["lr"]  # removed upstream
    changed["other"]["x"] = 2  # not upstream of train
    changed["train"]["toy"]["run"]["steps"] = 9  # the job's own: audited as job params
    (root / "params.yaml").write_text(yaml.safe_dump(changed))
    assert tracking.upstream_param_changes(root, "train") == {
        "set": {"evaluate.classifier.epochs": 3}, "removed": ["evaluate.classifier.lr"]
    }  # fmt: skip
    tags = tracking.lineage_tags(root, "train")
    assert json.loads(tags["dvc.upstream_params"])["set"] == {"evaluate.classifier.epochs": 3}


# --- issue 24: what `gm runs` and the MLflow UI show -------------------------------------------


def test_runs_table_names_its_hash_columns_and_the_experiment_opens_on_runs(tmp_path):
    from gm.audit import list_runs, render_runs

    root, _ = committed_params_project(tmp_path)
    params = {"family": "dcgan", "dataset": "toy"}
    tags = {"dvc.data": "aaaa1111aaaa.dir", "dvc.dep.datasets/pyramid/toy": "bbbb2222bbbb.dir"}
    dvc_run = tracking.RunHandle.open(root, "a", None, params, tags)
    cli_run = tracking.RunHandle.open(root, "b", None, params, {"dvc.data": "aaaa1111aaaa.dir"})
    cli_run.log_dataset("toy", str(root), "cccc3333cccc")
    rows = {r["name"]: r for r in list_runs(root)}
    assert (rows["a"]["data"], rows["a"]["prepared"]) == ("aaaa1111", "bbbb2222")
    assert (rows["b"]["data"], rows["b"]["prepared"]) == ("aaaa1111", "cccc3333")
    head = render_runs(list(rows.values())).splitlines()[0].split()
    # was: two columns called "dataset", the first mixing the two kinds of hash
    assert head[:7] == ["run", "name", "status", "commit", "data.dvc", "prepared", "family"]
    assert head.count("dataset") == 1  # the dataset's name (the param)
    client = MlflowClient(tracking.tracking_uri(root))
    exp = client.get_experiment_by_name("gm")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert dvc_run.run_id != cli_run.run_id
    # an experiment made by an older gm gets the tag when a run is next opened in it
    client.delete_experiment_tag(exp.experiment_id, "mlflow.experimentKind")
    tracking.RunHandle.open(root, "c", None, params, {})
    exp = client.get_experiment_by_name("gm")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


# --- issue 24: generators served through MLflow's python_function flavor ----------------------


def test_logged_generators_and_translators_load_as_pyfunc(tmp_path, monkeypatch):
    # `mlflow models serve -m models:/gm-cgan@champion` failed: "No suitable flavor backend".
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _, trainer = checkpoint(tmp_path, "cgan")
    run_id = logged_run(tmp_path, "toy", trainer)
    with tracking.using_uri(tracking.tracking_uri(tmp_path)):
        model = mlflow.pyfunc.load_model(f"runs:/{run_id}/generator")
        z = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
        labels = torch.tensor([0, 1, 2, 1])
        out = model.predict({"z": z.numpy(), "labels": labels.numpy()})
    with torch.no_grad():
        eager = trainer.model.generator(trainer.sampling_nets()).eval()(z, labels)
    assert out.shape == (4, 3, 16, 16) and np.allclose(out, eager.numpy(), atol=1e-5)
    # a translator (SRGAN x4): images in, images out, at any size its graph takes
    sr, _ = make("srgan")
    handle = tracking.RunHandle.open(tmp_path, "sr", None, {"family": "srgan"}, {})
    from gm.train.job import log_models

    log_models(handle, sr, {"resolution": 16, "channels": 3, "num_classes": 1})
    with tracking.using_uri(tracking.tracking_uri(tmp_path)):
        up = mlflow.pyfunc.load_model(f"runs:/{handle.run_id}/generator")
        x = torch.rand(2, 3, 4, 4) * 2 - 1
        assert up.predict({"images": x.numpy()}).shape == (2, 3, 16, 16)


@pytest.mark.slow
def test_a_registered_generator_is_served_over_http(tmp_path, monkeypatch):
    import os
    import urllib.request

    from .conftest import free_port, stop_process_group, wait_until_serving

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _, trainer = checkpoint(tmp_path, "cgan")
    run_id = logged_run(tmp_path, "toy", trainer)
    result = {"mlflow_run_id": run_id, "fid": 5.0, "step": 4}
    r = tracking.register_champion(tmp_path, "toy", result)  # as evaluate@ registers it
    assert r["champion"]
    port = free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking.tracking_uri(tmp_path),
               PATH=f"{BIN}:{os.environ['PATH']}")  # it execs uvicorn by name  # fmt: skip
    proc = subprocess.Popen(
        [BIN / "mlflow", "models", "serve", "-m", "models:/gm-toy@champion", "--env-manager",
         "local", "-h", "127.0.0.1", "-p", str(port), "--workers", "1"],
        env=env, cwd=tmp_path, start_new_session=True,
        stdout=(tmp_path / "serve.log").open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        try:
            wait_until_serving(proc, f"http://127.0.0.1:{port}/ping", "models serve", 120)
        except BaseException:
            print((tmp_path / "serve.log").read_text()[-3000:])
            raise
        z = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
        body = {"inputs": {"z": z.tolist(), "labels": [0, 2, 1]}}
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(req, timeout=60) as r:
            images = np.asarray(json.loads(r.read())["predictions"], dtype=np.float32)
    finally:
        stop_process_group(proc)
    with torch.no_grad():
        eager = trainer.model.generator(trainer.sampling_nets()).eval()(z, torch.tensor([0, 2, 1]))
    assert images.shape == (3, 3, 16, 16) and np.allclose(images, eager.numpy(), atol=1e-5)
