"""Hyperparameter search (gm.tune): search spaces and their errors, the best values as
params.yaml keys and `dvc exp run -S` arguments; end to end with real Ray Tune, MLflow and DVC:
ASHA stopping a bad learning rate, parent/child runs, the DVC stage and the round trip of
best_params.yaml into `dvc exp run`, a killed driver resumed by Tuner.restore, PBT's mutation
log, and a search submitted with `ray job submit` to a `ray start` cluster that logs into a
real `mlflow server`."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from gm import params
from gm.config import yaml_load
from gm.errors import ConfigError
from gm.train.job import TrainConfig
from gm.train.ray_train import RunSettings
from gm.tune import SearchConfig, check_search, held_run, nested, overrides, set_arguments

from .conftest import BIN, REPO, free_port, git
from .test_models_contract import TINY

PY = str(BIN / "python")


def dcgan_job(**run):
    settings = {"steps": 20, "batch_size": 8, "checkpoint_every": 10, **run}
    return TrainConfig(
        family="dcgan", dataset="toy", model=TINY["dcgan"], run=RunSettings(**settings)
    )


# -- search spaces ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "space, message",
    [
        ({"model.optim_g.lr": {"normal": [0, 1]}}, "unknown distribution 'normal'"),
        ({"model.optim_g.lr": {"loguniform": [0.0, 1.0]}}, "bounds must be > 0"),
        ({"model.optim_g.lr": {"uniform": [2.0, 1.0]}}, "low 2.0 must be below high 1.0"),
        ({"model.optim_g.lr": {"uniform": 0.1}}, "expected [low, high]"),
        ({"model.optim_g.lr": {"choice": []}}, "non-empty list"),
        ({"run.steps": {"choice": [10, 20]}}, "set by the search itself"),
        ({"optim_g.lr": {"choice": [0.1]}}, "start with model. or run."),
        ({"model.optim_g.lr": {"grid": [0.1, 0.2]}}, "grid values need search: random"),
    ],
)
def test_bad_search_spaces_are_refused_naming_the_key(space, message):
    with pytest.raises(ConfigError) as e:
        SearchConfig(job="x", space=space)
    assert message in str(e.value)
    assert f"space.{next(iter(space))}" in str(e.value) or "space" in str(e.value)


def test_pbt_mutates_only_optimizer_settings():
    with pytest.raises(ConfigError, match=r"space\.model\.ngf: PBT changes settings"):
        SearchConfig(
            job="x", scheduler="pbt", search="random", space={"model.ngf": {"choice": [8, 16]}}
        )
    with pytest.raises(ConfigError, match="PBT explores itself"):
        SearchConfig(job="x", scheduler="pbt", space={"model.optim_g.lr": {"choice": [0.1]}})
    SearchConfig(
        job="x",
        scheduler="pbt",
        search="random",
        space={"model.optim_g.lr": {"loguniform": [1e-4, 1e-2]}},
    )


def test_searched_keys_must_exist_in_the_jobs_config_and_give_valid_configs():
    job = dcgan_job()
    ok = SearchConfig(job="toy", space={"model.optim_g.betas.0": {"uniform": [0.0, 0.9]}})
    check_search(ok, job, "tune.t")  # unset in params, but a key of the family's config
    missing = SearchConfig(job="toy", space={"model.optim_q.lr": {"choice": [0.1]}})
    with pytest.raises(ConfigError) as e:
        check_search(missing, job, "tune.t")
    assert "tune.t.space.model.optim_q.lr" in str(e.value) and "optim_g" in str(e.value)
    beyond = SearchConfig(job="toy", space={"model.optim_g.betas.2": {"choice": [0.1]}})
    with pytest.raises(ConfigError, match="has no item 2"):
        check_search(beyond, job, "tune.t")
    invalid = SearchConfig(job="toy", space={"run.batch_size": {"choice": [8, 0]}})
    # the job's own message once, as for trial_run below
    refused = r"^tune\.t\.space\.run\.batch_size: value 0: must be >= 1$"
    with pytest.raises(ConfigError, match=refused):
        check_search(invalid, job, "tune.t")
    two_workers = dcgan_job(num_workers=2)
    with pytest.raises(ConfigError, match="one process each"):
        check_search(ok, two_workers, "tune.t")
    no_kid = dcgan_job(kid_samples=0)  # the in-training KID is off: nothing to rank by
    with pytest.raises(ConfigError, match=r"tune\.t\.metric: kid, but toy has run.kid_samples 0"):
        check_search(ok, no_kid, "tune.t")
    check_search(SearchConfig(job="toy", metric="loss/G", space=ok.space), no_kid, "tune.t")


def test_held_run_keys_are_checked_against_the_search_and_the_job():
    space = {"model.optim_g.lr": {"choice": [1e-3]}}
    for held, message in [
        ({"steps": 10}, r"trial_run\.steps: set by the search itself"),
        ({"checkpoint_every": 5}, r"trial_run\.checkpoint_every: set by the search itself"),
        ({"batch_size": 4}, r"trial_run\.batch_size: searched \(space\.run\.batch_size\)"),
    ]:
        with pytest.raises(ConfigError, match=message):
            SearchConfig(job="x", space={**space, "run.batch_size": {"choice": [4]}},
                         trial_run=held)  # fmt: skip
    job = dcgan_job(ema_beta=0.99)
    search = SearchConfig(job="toy", space=space, trial_run={"ema_beta": 0, "seed": 3})
    assert held_run(search, job, "tune.t") == {"ema_beta": 0.0, "seed": 3}
    assert check_search(search, job, "tune.t") == {"ema_beta": 0.0, "seed": 3}
    for held, message in [
        ({"ema_beta": 1.5}, r"ema_beta: value 1\.5: must be in \[0, 1\)$"),
        ({"bogus": 1}, r"bogus: value 1: run\.bogus is not a key of the job's config"),
    ]:
        bad = SearchConfig(job="toy", space=space, trial_run=held)
        with pytest.raises(ConfigError, match=rf"^tune\.t\.trial_run\.{message}"):
            check_search(bad, job, "tune.t")


def test_params_tune_section_names_an_existing_job(tmp_path):
    raw = {
        "datasets": {"toy": {"top_resolution": 16}},
        "train": {"toy": {"family": "dcgan", "dataset": "toy", "model": TINY["dcgan"]}},
        "tune": {"s": {"job": "nosuch", "space": {"model.optim_g.lr": {"choice": [0.1]}}}},
    }
    with pytest.raises(ConfigError, match=r"tune\.s\.job: 'nosuch' is not a job's params key "
                       r"\(train\.toy\)"):  # fmt: skip
        params.parse(raw)
    # the job by its params key, the one the tune stage depends on: a bare name is refused
    raw["tune"]["s"]["job"] = "toy"
    with pytest.raises(ConfigError, match=r"tune\.s\.job: 'toy' names no section: write "
                       r"train\.toy"):  # fmt: skip
        params.parse(raw)
    raw["tune"]["s"]["job"] = "train_paired.toy"  # the name, in another section
    with pytest.raises(ConfigError, match=r"'train_paired\.toy' is not a job's params key"):
        params.parse(raw)
    raw["tune"]["s"]["job"] = "train.toy"
    p = params.parse(raw)
    assert p.tune["s"].space == {"model.optim_g.lr": {"choice": [0.1]}}
    assert p.tune["s"].job_name == "toy"  # of train.toy
    assert p.job("toy")[0] == p.job("train.toy")[0] == "train"
    assert p.job("train.toy")[1] is p.train["toy"]
    for missing in ("train_paired.toy", "bogus.toy", "train.nosuch"):
        with pytest.raises(KeyError):
            p.job(missing)


def test_best_values_become_params_keys_and_dvc_set_arguments():
    job = dcgan_job()
    values = {"model.optim_g.lr": 3e-05, "model.optim_g.betas.0": 0.25, "run.batch_size": 16}
    flat = overrides("train", "toy", values, job)
    # a list item is set through its whole list, the other items kept from the job's config
    assert flat == {
        "train.toy.model.optim_g.lr": 3e-05,
        "train.toy.model.optim_g.betas": [0.25, 0.999],
        "train.toy.run.batch_size": 16,
    }
    assert set_arguments(flat) == [
        "++train.toy.model.optim_g.lr=3e-05",
        "++train.toy.model.optim_g.betas=[0.25,0.999]",
        "++train.toy.run.batch_size=16",
    ]
    assert nested(flat)["train"]["toy"]["model"]["optim_g"]["betas"] == [0.25, 0.999]


def test_gm_tune_unknown_search_exits_2_naming_it(tmp_path, capsys):
    from gm.cli import main

    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"datasets": {"toy": {"top_resolution": 16}}}))
    assert main(["tune", "nosuch", "--params", str(p)]) == 2
    assert "tune.nosuch: no such search" in capsys.readouterr().err


# -- end to end -------------------------------------------------------------------------------


def search_repo(project: Path, search: dict, family: str = "dcgan") -> Path:
    """``project`` with a params.yaml (dataset toy, job toy: a tiny DCGAN, search toy), a
    domain classifier and a dvc.yaml with the tune stage and the job's train stage."""
    from gm.metrics.classifier import ClassifierConfig, save_classifier, train_classifier

    ds = project / "datasets/pyramid/toy"
    ccfg = ClassifierConfig(width=4, features=8, steps=20, batch_size=8)
    net, report = train_classifier(ds, 16, ccfg, progress=False)
    save_classifier(project / "models/classifiers/toy/classifier.pt", net, ccfg, report)
    run = {"steps": 20, "batch_size": 8, "checkpoint_every": 10, "cpus_per_worker": 1}
    p = {
        "datasets": {"toy": {"top_resolution": 16}},
        "train": {
            "toy": {
                "family": family,
                "dataset": "toy",
                "model": TINY[family],
                "run": run,
            }
        },
        "tune": {"toy": {"job": "train.toy", **search}},
    }
    (project / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    own = yaml_load((REPO / "dvc.yaml").read_text())  # the project's tune stage's params
    stages = {
        "tune": {
            "foreach": "${tune}",
            "do": {
                "cmd": "python -m pipelines.tune --name ${key}",
                "deps": ["datasets/pyramid/toy", "models/classifiers/toy/classifier.pt"],
                "params": own["stages"]["tune"]["do"]["params"],  # tested below
                "outs": ["tune/${key}"],
                "metrics": [{"reports/tune/${key}.json": {"cache": False}}],
                "plots": [{"reports/tune/${key}.png": {"cache": False}}],
            },
        },
        "train": {
            "cmd": "python -m pipelines.train --name toy --dataset datasets/pyramid/toy "
            "--out models/toy --runs runs",
            "deps": ["datasets/pyramid/toy"],
            "params": ["train.toy"],
            "outs": ["models/toy/checkpoint.pt"],
            "metrics": [{"models/toy/metrics.json": {"cache": False}}],
        },
    }
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    with open(project / ".gitignore", "a") as f:
        f.write("tune/\nreports/\n")
    git(project, "add", "-A")
    git(project, "commit", "-qm", "search")
    return project


def env_for(root: Path, **extra) -> dict[str, str]:
    env = dict(os.environ, **extra)
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def children_of(client: MlflowClient, parent_id: str):
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs(
        [exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=1000
    )


@pytest.mark.slow
def test_tune_stage_asha_stops_a_bad_lr_and_best_params_round_trip_into_dvc_exp_run(project):
    """One search through `dvc repro tune@toy` over a conditional VAE's bits/dim: two trials
    at lr 3e-3 and one at 1e-9 (it cannot learn), run in order. ASHA stops the bad one at its
    first rung (10 of 20 steps); MLflow has the search's run with one child per trial;
    best_params.yaml's `set` arguments train the job with the winning lr via `dvc exp run`."""
    search = {
        "metric": "elbo/bits_per_dim",
        "scheduler": "asha",
        "search": "random",
        "num_samples": 1,
        "max_concurrent_trials": 1,
        "steps": 20,
        "report_every": 5,
        "grace_steps": 10,
        "reduction_factor": 2,
        "space": {"model.optim.lr": {"grid": [0.003, 0.003, 1.0e-9]}},
        "trial_run": {"seed": 3},  # held in every trial, not a searched value
    }
    root = search_repo(project, search, family="cvae")
    env = env_for(root)
    r = subprocess.run(
        ["dvc", "repro", "tune@toy"], cwd=root, env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    rows = list(csv.DictReader(open(root / "tune/toy/trials.csv")))
    assert len(rows) == 3
    bad = [row for row in rows if float(row["model.optim.lr"]) < 1e-6]
    good = [row for row in rows if float(row["model.optim.lr"]) > 1e-3]
    assert len(bad) == 1 and bad[0]["status"] == "stopped" and int(bad[0]["steps"]) == 10
    assert any(row["status"] == "full" and int(row["steps"]) == 20 for row in good)
    bpd = "elbo/bits_per_dim"
    assert float(bad[0][bpd]) > max(float(row[bpd]) for row in good)

    summary = json.loads((root / "reports/tune/toy.json").read_text())
    assert summary["trials"] == 3 and summary["stopped_early"] >= 1
    assert summary["trial_steps"] < summary["full_budget_steps"] == 60
    assert (root / "reports/tune/toy.png").stat().st_size > 1000
    best = yaml_load((root / "tune/toy/best_params.yaml").read_text())
    assert best["params"]["train"]["toy"]["model"]["optim"]["lr"] == 0.003
    assert best["set"] == ["++train.toy.model.optim.lr=0.003"]

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    parent = client.get_run(summary["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["dvc.stage"] == "tune@toy"
    assert parent.data.metrics[f"best_{bpd}"] == pytest.approx(best["metric"]["value"])
    kids = children_of(client, parent.info.run_id)
    assert len(kids) == 3
    assert {k.data.params["run.seed"] for k in kids} == {"3"}  # trial_run, not the job's 0
    by_id = {k.info.run_id: k for k in kids}
    assert {row["mlflow_run_id"] for row in rows} == set(by_id)
    bad_run = by_id[bad[0]["mlflow_run_id"]]
    assert bad_run.info.status == "KILLED" and bad_run.data.tags["gm.tune.status"] == "stopped"
    assert bad_run.data.params["model.optim.lr"] == "1e-09"
    assert [m.step for m in client.get_metric_history(bad_run.info.run_id, "kid")] == [5, 10]
    best_run = by_id[best["trial"]["mlflow_run_id"]]
    assert best_run.data.tags["gm.tune.best"] == "true"
    assert best_run.info.status == "FINISHED"
    assert len(client.get_metric_history(best_run.info.run_id, "kid")) == 4
    assert "images" in [a.path for a in client.list_artifacts(best_run.info.run_id)]

    # the stage depends on its own entry and its job's params key alone: another job's
    # change leaves it up to date, a change to its job does not
    text = (root / "params.yaml").read_text()
    raw = yaml_load(text)
    raw["train"]["other"] = json.loads(json.dumps(raw["train"]["toy"]))  # a copy
    assert stage_status(root, env, raw) == {}
    raw["train"]["toy"]["run"]["batch_size"] = 4
    changed = {"changed deps": {"params.yaml": {"train.toy": "modified"}}}
    assert stage_status(root, env, raw) == {"tune@toy": [changed]}
    (root / "params.yaml").write_text(text)

    # best_params.yaml → dvc exp run -S: the job trains with the best lr
    cmd = ["dvc", "exp", "run", "train"]
    for s in best["set"]:
        cmd += ["-S", s]
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    used = yaml_load((root / "params.yaml").read_text())["train"]["toy"]["model"]
    assert used["optim"]["lr"] == 0.003
    m = json.loads((root / "models/toy/metrics.json").read_text())
    trained = client.get_run(m["mlflow_run_id"]).data.params
    assert trained["model.optim.lr"] == "0.003" and trained["run.seed"] == "0"


def stage_status(root: Path, env: dict, raw: dict) -> dict:
    """`dvc status tune@toy --json` with params.yaml set to ``raw``."""
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    r = subprocess.run(["dvc", "status", "tune@toy", "--json"], cwd=root, env=env,
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(r.stdout)


def trial_folders(folder: Path):
    """(trial id, its folder, its result.json rows) of every trial with a result under
    ``folder``'s Tune experiments."""
    for f in folder.glob("tune/*/_trial_*/result.json"):
        rows = [json.loads(line) for line in f.read_text().splitlines()]
        if rows:
            yield rows[-1]["trial_id"], f.parent, rows


def result_lines(folder: Path) -> dict[str, int]:
    """Distinct steps reported per trial, from Tune's result.json files (trial id → count).
    Distinct, not lines: a driver killed after a trial reported a step but before that step's
    checkpoint was kept makes the resumed trial report the step again (at least once)."""
    return {t: len({row["step"] for row in rows}) for t, _, rows in trial_folders(folder)}


def checkpoint_steps(folder: Path) -> dict[str, list[int]]:
    """Indices of the checkpoint folders in each trial's directory (trial id → sorted)."""
    return {t: sorted(int(c.name.split("_")[1]) for c in d.glob("checkpoint_*"))
            for t, d, _ in trial_folders(folder)}  # fmt: skip


@pytest.mark.slow
def test_a_search_whose_driver_is_killed_resumes_without_restarting_or_losing_trials(project):
    search = {
        "metric": "kid",
        "scheduler": "fifo",
        "search": "random",
        "num_samples": 1,
        "max_concurrent_trials": 1,
        "steps": 240,
        "report_every": 20,
        "space": {"model.optim_g.lr": {"grid": [0.002, 0.001, 0.0005]}},
    }
    root = search_repo(project, search)
    # Tune writes result.json beside the driver and uploads it with the experiment state, by
    # default at most every 10 s: a trial here takes under 10 s on a fast machine, so the
    # state is saved every second for the progress below to show in runs/ as it happens.
    env = env_for(root, TUNE_GLOBAL_CHECKPOINT_S="1")
    cmd = [PY, "-m", "pipelines.tune", "--name", "toy"]
    log = open(root / "first.log", "w")
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    full = 240 // 20
    deadline = time.monotonic() + 300
    try:
        while True:  # one trial finished, the next one part-way
            lines = result_lines(root / "runs")
            if full in lines.values() and any(2 <= n < full for n in lines.values()):
                break
            assert proc.poll() is None, (root / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"no progress: {lines}"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
        proc.wait()
    before = result_lines(root / "runs")
    finished = [t for t, n in before.items() if n == full]
    partial = [t for t, n in before.items() if n < full]
    assert finished and partial, before
    assert not (root / "tune/toy").exists()  # no partial results
    # No checkpoint was deleted while the search ran: the experiment state Tune last saved
    # may name an older one than the trial's latest (it is saved after the checkpoint), and
    # a trial resumed from a deleted checkpoint ends in error.
    ckpts = checkpoint_steps(root / "runs")
    for t in finished:
        assert ckpts[t] == list(range(full)), ckpts

    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resuming the search" in r.stdout
    after = result_lines(root / "runs")
    assert len(after) == 3 and all(n == full for n in after.values()), after
    rows = {row["trial_id"]: row for row in csv.DictReader(open(root / "tune/toy/trials.csv"))}
    assert {row["status"] for row in rows.values()} == {"full"}
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    starts = {
        t: [m.value for m in client.get_metric_history(rows[t]["mlflow_run_id"], "start_step")]
        for t in rows
    }
    for t in finished:  # not restarted: run once, or continued from a checkpoint when
        # Tune's saved state had not yet recorded the trial's end
        assert starts[t] == [0.0] or (len(starts[t]) == 2 and starts[t][1] > 0), starts
    for t in partial:  # continued from its checkpoint (step > 0), in the same child run
        assert len(starts[t]) == 2 and starts[t][0] == 0 and starts[t][1] > 0, starts
    # once the search has ended each trial keeps its latest checkpoint only
    ckpts = checkpoint_steps(root / "runs")
    assert len(ckpts) == 3 and all(c == [full - 1] for c in ckpts.values()), ckpts
    summary = json.loads((root / "reports/tune/toy.json").read_text())
    assert len(children_of(client, summary["mlflow_parent_run_id"])) == 3


@pytest.mark.slow
def test_pbt_search_keeps_its_mutation_log(project):
    search = {
        "metric": "kid",
        "scheduler": "pbt",
        "search": "random",
        "num_samples": 3,
        "max_concurrent_trials": 3,
        "cpus_per_trial": 0.5,
        "steps": 60,
        "report_every": 5,
        "perturbation_steps": 10,
        "space": {
            "model.optim_g.lr": {"loguniform": [1e-5, 1e-2]},
            "model.optim_d.lr": {"loguniform": [1e-5, 1e-2]},
        },
    }
    root = search_repo(project, search)
    r = subprocess.run(
        [PY, "-m", "pipelines.tune", "--name", "toy"],
        cwd=root,
        env=env_for(root),
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    pbt = root / "tune/toy/pbt"
    log = [json.loads(line) for line in (pbt / "pbt_global.txt").read_text().splitlines()]
    assert log, "PBT made no exploit step"
    for target, source, *_, new in log:  # [trial, cloned trial, iters, old, new config]
        assert target != source
        assert set(new) >= {"model.optim_g.lr", "model.optim_d.lr"}
    assert any(new != old for *_, old, new in log)
    rows = list(csv.DictReader(open(root / "tune/toy/trials.csv")))
    assert len(rows) == 3 and all(int(row["steps"]) == 60 for row in rows)


@pytest.mark.slow
def test_search_submitted_to_a_ray_start_cluster_logs_every_trial_to_an_mlflow_server(
    project, mlflow_server, tmp_path
):
    """`ray start --head` on loopback, `ray job submit` of the tune stage's command; the job
    gets the MLflow server's URI through its runtime_env (not the submitting shell's
    environment); four trials, two at a time, each a child run on the server."""
    search = {
        "metric": "kid",
        "scheduler": "fifo",
        "search": "optuna",
        "num_samples": 4,
        "max_concurrent_trials": 2,
        "steps": 20,
        "report_every": 5,
        "space": {"model.optim_g.lr": {"loguniform": [1e-4, 1e-2]}},
    }
    root = search_repo(project, search)
    # RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0: the head stops at SIGTERM, without first
    # draining for 30 s (time for a Serve deployment's proxies; there is none here)
    env = env_for(root, RAY_AUTH_MODE="token", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")

    def start_head(attempt: int):
        port, dash = free_port(), free_port()
        temp = Path("/tmp") / f"gmray{port}"  # short: Ray's socket paths are length-limited
        start = [
            str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
            "--port", str(port), "--num-cpus", "3", "--include-dashboard", "true",
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
            "--temp-dir", str(temp), "--disable-usage-stats",
            # the suite's own Ray (the ray_local fixture) holds the default agent ports: a
            # second node on this machine needs its own, or its job agent never comes up
            "--dashboard-agent-listen-port", str(free_port()),
            "--dashboard-agent-grpc-port", str(free_port()),
            "--metrics-export-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port()),
            "--ray-client-server-port", str(free_port()),
        ]  # fmt: skip
        # --block keeps `ray start` in the foreground: killing its process group stops
        # exactly this cluster (`ray stop` would stop every Ray on the machine, the suite's).
        log = open(tmp_path / f"ray-start-{attempt}.log", "w")  # noqa: SIM115 - closed below
        head = subprocess.Popen(start, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        return head, f"http://127.0.0.1:{dash}", log

    # A port chosen free can be taken before Ray binds it (the suite's own Ray is busy beside
    # this one): a head that exits at once is started again on new ports, once.
    for attempt in range(2):
        head, address, log = start_head(attempt)
        deadline = time.monotonic() + 180
        while subprocess.run([str(BIN / "ray"), "job", "list", "--address", address],
                             env=env, capture_output=True).returncode:  # fmt: skip
            if head.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(1)
        else:
            break
        log.close()
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)
        head.wait()
        text = (tmp_path / f"ray-start-{attempt}.log").read_text()[-3000:]
        assert attempt == 0, f"ray start --head did not come up twice; its output:\n{text}"
    try:
        runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": mlflow_server, "PYTHONPATH": str(REPO)}}
        submit = [
            str(BIN / "ray"), "job", "submit", "--address", address,
            "--runtime-env-json", json.dumps(runtime_env), "--",
            # the CLI shell-quotes each word after --: a compound command goes through bash -c
            "bash", "-c", f"cd {root} && {PY} -m pipelines.tune --name toy",
        ]  # fmt: skip
        while True:  # the Jobs API can answer before the node's job agent is up
            r = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=600)
            if "No available agent" not in r.stderr or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "succeeded" in r.stdout.lower()
    finally:
        log.close()
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
    assert not (root / "mlflow.db").exists()  # everything went to the server
    summary = json.loads((root / "reports/tune/toy.json").read_text())
    assert summary["cluster_cpus"] == 3.0  # the job attached to the started cluster
    client = MlflowClient(mlflow_server)
    kids = children_of(client, summary["mlflow_parent_run_id"])
    assert len(kids) == 4
    for k in kids:
        assert len(client.get_metric_history(k.info.run_id, "kid")) == 4
        assert k.info.status == "FINISHED"
    rows = list(csv.DictReader(open(root / "tune/toy/trials.csv")))
    assert {row["mlflow_run_id"] for row in rows} == {k.info.run_id for k in kids}


def test_tune_help_lists_the_command():
    r = subprocess.run([str(BIN / "gm"), "tune", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "best_params.yaml" in r.stdout and "RAY_ADDRESS" in r.stdout


@pytest.mark.slow
def test_search_with_its_storage_path_on_an_s3_server(project, s3_server):
    """Tune's storage_path on S3 (`--runs s3://…`, the cluster setting): trial checkpoints,
    the experiment state and gm's search state land in the bucket of a real S3-protocol server
    on loopback; a second run of the same command finds the finished search there."""
    search = {
        "metric": "kid",
        "scheduler": "fifo",
        "search": "random",
        "num_samples": 2,
        "max_concurrent_trials": 2,
        "steps": 10,
        "report_every": 5,
        "space": {"model.optim_g.lr": {"choice": [0.002, 0.001]}},
    }
    root = search_repo(project, search)
    env = env_for(root, **s3_server["env"])
    cmd = [PY, "-m", "pipelines.tune", "--name", "toy", "--runs", "s3://gm-test/gm-runs"]
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert not (root / "runs").exists()
    listing = s3_server["client"].list_objects_v2(Bucket="gm-test", Prefix="gm-runs/tune/")
    keys = [o["Key"] for o in listing.get("Contents", [])]
    assert any(k.endswith("/gm_tune.json") for k in keys)
    assert any("/checkpoint_" in k and k.endswith("/checkpoint.pt") for k in keys)
    assert any("experiment_state" in k for k in keys)
    kept: dict[str, set[str]] = {}  # trial folder → its checkpoint folders left in the bucket
    for k in keys:
        parts = k.split("/")
        for i, part in enumerate(parts[:-1]):
            if part.startswith("checkpoint_"):
                kept.setdefault(parts[i - 1], set()).add(part)
    # two reports each; once the search has ended only each trial's latest is kept
    assert len(kept) == 2 and all(c == {"checkpoint_000001"} for c in kept.values()), kept
    rows = list(csv.DictReader(open(root / "tune/toy/trials.csv")))
    assert len(rows) == 2 and {row["status"] for row in rows} == {"full"}
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "resuming the search" in r.stdout, r.stderr[-3000:]
