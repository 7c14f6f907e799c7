"""MLflow tracking: one run per training with lineage; the default SQLite store and a real
`mlflow server` on loopback."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess

import mlflow
import pytest
import torch
import yaml
from mlflow import MlflowClient

from gm import tracking
from gm.train.checkpoint import load_checkpoint
from gm.train.job import TrainConfig, run_job
from gm.train.ray_train import RunSettings

from .conftest import free_port
from .test_models_contract import TINY


def test_flatten_nested_params():
    flat = tracking.flatten({"run": {"steps": 3, "betas": (0.5, 0.9)}, "family": "dcgan"})
    assert flat == {"run.steps": "3", "run.betas": "[0.5, 0.9]", "family": "dcgan"}


def test_lineage_tags_follow_git_and_dvc(project):
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True, check=True
    ).stdout.strip()
    tags = tracking.lineage_tags(project, "train")
    assert tags["git.commit"] == head and tags["mlflow.source.git.commit"] == head
    assert tags["git.dirty"] == "false" and tags["dvc.data"] == "abc123.dir"
    assert tags["dvc.stage"] == "train" and tags["gm.version"]
    # The dependency hashes a stage's run is tagged with are the ones DVC then locks.
    subprocess.run(["dvc", "repro", "-q", "train"], cwd=project, check=True)
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["train"]["deps"]
    assert {f"dvc.dep.{d['path']}": d["md5"] for d in lock} == {
        k: v for k, v in tags.items() if k.startswith("dvc.dep.")
    }
    # What DVC rewrites while a pipeline runs (dvc.lock) does not make a run dirty.
    from .conftest import git

    git(project, "add", "dvc.lock")
    git(project, "commit", "-qm", "lock")
    (project / "dvc.lock").write_text((project / "dvc.lock").read_text() + "# rewritten\n")
    assert tracking.lineage_tags(project)["git.dirty"] == "false"
    (project / "data.dvc").write_text((project / "data.dvc").read_text() + "# edited\n")
    tags = tracking.lineage_tags(project)
    assert tags["git.dirty"] == "true" and tags["git.dirty_files"] == "data.dvc"
    assert "dvc.dep.notes.txt" not in tracking.lineage_tags(project, "no-such-stage")


def test_stage_graph_is_built_once_and_rebuilt_when_dvc_yaml_or_params_change(project):
    """Every stage of a pipeline asks for its lineage: DVC's graph is built once, kept in
    .dvc/tmp keyed by dvc.yaml and params.yaml, and built again when either changes."""
    first = tracking._stage_graph(project, "train")
    assert first == ([("datasets/pyramid/toy", str(project / "datasets/pyramid/toy")),
                      ("notes.txt", str(project / "notes.txt"))], set())  # fmt: skip
    cached = list((project / ".dvc/tmp/gm-stage-graphs").glob("*.json"))
    assert len(cached) == 1 and "train" in json.loads(cached[0].read_text())
    assert tracking._stage_graph(project, "train") == first
    stages = {"prep": {"cmd": "echo p > p.txt", "params": ["prep"], "outs": ["p.txt"]},
              "train": {"cmd": "echo ok", "deps": ["p.txt", "notes.txt"]}}  # fmt: skip
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    (project / "params.yaml").write_text("prep: {n: 1}\n")
    assert tracking._stage_graph(project, "train") == (
        [("p.txt", str(project / "p.txt")), ("notes.txt", str(project / "notes.txt"))],
        {"prep"},
    )
    assert tracking._stage_graph(project, "no-such-stage") is None
    assert len(list((project / ".dvc/tmp/gm-stage-graphs").glob("*.json"))) == 2


def test_dataset_digest_is_the_dvc_hash_of_a_stage_output(project):
    ds = project / "datasets/pyramid/toy"
    content = json.loads((ds / "manifest.json").read_text())["content_hash"]
    assert tracking.dataset_digest(project, ds) == (content, "content")  # not a DVC output
    lock = {
        "schema": "2.0",
        "stages": {"prep": {"outs": [{"path": "datasets/pyramid/toy", "md5": "d00d.dir"}]}},
    }
    (project / "dvc.lock").write_text(yaml.safe_dump(lock))
    assert tracking.dataset_digest(project, ds) == ("d00d.dir", "dvc")


def test_unreachable_server_fails_before_any_compute(project, monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = TrainConfig(family="dcgan", dataset="toy", model=TINY["dcgan"])
    with pytest.raises(tracking.TrackingError, match=f"MLFLOW_TRACKING_URI={uri}"):
        run_job("toy", cfg, project / "datasets/pyramid/toy", project / "models/toy", project)
    assert not (project / "runs").exists() and not (project / "models").exists()


def tiny_job(family="cgan", steps=4, workers=1):
    run = RunSettings(steps=steps, batch_size=4, checkpoint_every=2, num_workers=workers)
    return TrainConfig(family=family, dataset="toy", model=TINY[family], run=run)


@pytest.mark.slow
def test_one_run_per_training_with_metrics_images_model_and_lineage(
    ray_local, project, monkeypatch
):
    from gm.metrics.classifier import ClassifierConfig, save_classifier, train_classifier

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ds, out = project / "datasets/pyramid/toy", project / "models/toy"
    ccfg = ClassifierConfig(width=4, features=8, steps=5, batch_size=8)
    net, report = train_classifier(ds, 16, ccfg, progress=False)
    save_classifier(project / "clf.pt", net, ccfg, report)
    m = run_job(
        "toy",
        tiny_job(workers=2),
        ds,
        out,
        project,
        stage="train",
        progress=False,
        classifier=project / "clf.pt",
    )
    assert (project / "mlflow.db").is_file()  # the default store: sqlite at the repo root
    assert "MLFLOW_TRACKING_URI" not in os.environ  # logging the model leaks no global URI
    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("gm").experiment_id])
    assert len(runs) == 1  # two workers, one run
    run = runs[0]
    assert run.info.run_id == m["mlflow_run_id"] and run.info.status == "FINISHED"
    p = run.data.params
    assert p["family"] == "cgan" and p["model.z_dim"] == "8" and p["run.num_workers"] == "2"
    assert p["model.optim_g.betas"] == "[0.5, 0.999]" and p["data.num_classes"] == "3"
    for key in ("loss/D", "loss/G", "images_per_s", "lr/G", "lr/D"):
        assert [x.step for x in client.get_metric_history(run.info.run_id, key)] == [1, 2, 3, 4]
    kid = client.get_metric_history(run.info.run_id, "kid")  # in-training KID per checkpoint
    assert [x.step for x in kid] == [2, 4] and all(x.value == x.value for x in kid)
    # history.csv: a row per run.log_every steps (auto: steps / 50, here 1), KID on the
    # checkpoint rows only; plots/: one curve per file for `dvc plots show`
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"]
    assert [r["kid"] != "" for r in rows] == [False, True, False, True]
    plots = {f.name: f.read_text().splitlines() for f in (out / "plots").iterdir()}
    assert {"loss_D.csv", "loss_G.csv", "kid.csv", "lr_D.csv", "images_per_s.csv"} <= set(plots)
    assert plots["loss_G.csv"][0] == "step,loss/G" and len(plots["loss_G.csv"]) == 5
    assert [line.split(",")[0] for line in plots["kid.csv"][1:]] == ["2", "4"]
    assert float(plots["kid.csv"][2].split(",")[1]) == pytest.approx(kid[1].value, rel=1e-5)
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "final/plots")}
    assert "final/plots/loss_G.csv" in logged
    t = run.data.tags
    content = json.loads((ds / "manifest.json").read_text())["content_hash"]
    assert t["dvc.data"] == "abc123.dir" and t["dvc.stage"] == "train"
    assert t["dvc.dep.notes.txt"] and t["dvc.dep.datasets/pyramid/toy"].endswith(".dir")
    assert t["git.dirty"] == "false" and len(t["git.commit"]) == 40
    assert '"CPU"' in t["ray.cluster_resources"] and t["gm.version"]
    inputs = client.get_run(run.info.run_id).inputs.dataset_inputs
    assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [("toy", content[:36])]

    files = {f.path for f in client.list_artifacts(run.info.run_id, "final")}
    assert {"final/checkpoint.pt", "final/samples.png", "final/metrics.json"} <= files
    images = [f.path for f in client.list_artifacts(run.info.run_id, "images")]
    assert len([f for f in images if f.endswith(".png")]) == 2  # a grid at steps 2 and 4

    payload = load_checkpoint(out / "checkpoint.pt", family="cgan")
    assert payload["extra"]["mlflow_run_id"] == run.info.run_id
    assert payload["trainer"]["step"] == 4 and m["images_seen"] == 4 * 4 * 2

    # The exported generator: (z, labels) → images, for a batch size other than the example's.
    # (set_tracking_uri also exports MLFLOW_TRACKING_URI; monkeypatch removes it afterwards)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project}/mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{project}/mlflow.db")
    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/generator")
    x = model(torch.randn(5, 8), torch.tensor([0, 1, 2, 0, 1]))
    assert tuple(x.shape) == (5, 3, 16, 16)

    # Relaunching with a bigger budget continues the same Ray run and the same MLflow run.
    m2 = run_job("toy", tiny_job(steps=6, workers=2), ds, out, project, progress=False)
    assert m2["mlflow_run_id"] == run.info.run_id and m2["resumed_from"] == 4
    assert len(client.search_runs([run.info.experiment_id])) == 1
    steps = [x.step for x in client.get_metric_history(run.info.run_id, "loss/G")]
    assert steps == [1, 2, 3, 4, 5, 6]

    # run.kid_samples 0: the same stage with its classifier but no in-training KID
    job = tiny_job(steps=2)
    job = dataclasses.replace(job, run=dataclasses.replace(job.run, kid_samples=0))
    off = project / "models/no_kid"
    m3 = run_job("no_kid", job, ds, off, project, progress=False, classifier=project / "clf.pt")
    assert "kid" not in m3 and "kid" not in next(csv.DictReader((off / "history.csv").open()))
    assert client.get_metric_history(m3["mlflow_run_id"], "kid") == []
    assert not (off / "plots" / "kid.csv").exists()


@pytest.mark.slow
def test_logs_to_a_real_mlflow_server(ray_local, project, mlflow_server, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    ds, out = project / "datasets/pyramid/toy", project / "models/toy"
    m = run_job("toy", tiny_job("dcgan", steps=2), ds, out, project, progress=False)
    client = MlflowClient(mlflow_server)
    run = client.get_run(m["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["family"] == "dcgan"
    assert [x.step for x in client.get_metric_history(run.info.run_id, "loss/D")] == [1, 2]
    assert not (project / "mlflow.db").exists()  # nothing went to the local store
    local = client.download_artifacts(run.info.run_id, "final/metrics.json", str(tmp_path))
    assert '"step": 2' in open(local).read()
