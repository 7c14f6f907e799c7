"""infra/: cluster configs checked against Ray's own schema, KubeRay and MLflow manifests checked
for what gm relies on (versions, auth, secrets only by reference, health checks), and a DVC
remote round trip (push, then pull into a fresh clone without recomputing)."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, git, random_rgb, save

INFRA = REPO / "infra"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", re.IGNORECASE)


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


# ---------------------------------------------------------------- ray up


@pytest.mark.parametrize("name", ["cluster-local.yaml", "cluster-aws.yaml"])
def test_ray_cluster_configs_pass_rays_schema(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((INFRA / "ray" / name).read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head  # dashboard and Jobs API on loopback
    for cmds in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert any("RAY_AUTH_MODE=token" in c for c in cmds)
    assert "requirements.lock" in " ".join(config["setup_commands"])  # the pinned environment
    # the check can fail: a misspelt key is rejected by the same schema
    broken = copy.deepcopy(config)
    broken["max_wrokers"] = 3
    with pytest.raises(Exception, match="max_wrokers"):
        validate_config(prepare_config(broken))


# ---------------------------------------------------------------- KubeRay


def _containers(spec: dict):
    yield from spec["headGroupSpec"]["template"]["spec"]["containers"]
    for group in spec["workerGroupSpecs"]:
        yield from group["template"]["spec"]["containers"]


def _env_by_reference(container: dict) -> None:
    for var in container.get("env", []):
        if SECRET_NAME.search(var["name"]):
            assert "value" not in var and "secretKeyRef" in var["valueFrom"], var["name"]


def test_kuberay_manifests_match_the_installed_ray_and_keep_secrets_out():
    import ray

    cluster = next(
        d for d in documents(INFRA / "kuberay/raycluster.yaml") if d["kind"] == "RayCluster"
    )
    job = documents(INFRA / "kuberay/rayjob.yaml")[0]
    assert job["kind"] == "RayJob" and "dvc repro" in job["spec"]["entrypoint"]
    for spec in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        assert spec["rayVersion"] == ray.__version__  # the image's Ray is the one we test with
        assert spec["authOptions"]["mode"] == "token"
        for c in _containers(spec):
            assert c["resources"]["requests"] == c["resources"]["limits"], c["name"]
            _env_by_reference(c)
            names = {v["name"] for v in c.get("env", [])}
            assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= names, c["name"]
    for doc in documents(INFRA / "kuberay/raycluster.yaml") + [job]:
        assert doc["apiVersion"] in ("ray.io/v1", "v1")
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1" and groups["gpu"]["minReplicas"] == 0


# ---------------------------------------------------------------- MLflow server


def test_mlflow_deployment_serves_artifacts_checks_health_and_reads_secrets_from_env():
    docs = {d["kind"]: d for d in documents(INFRA / "mlflow/kubernetes.yaml")}
    pod = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    _env_by_reference(pod)
    env = {v["name"]: v for v in pod["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["key"]
    assert env["MLFLOW_ARTIFACTS_DESTINATION"]["value"].startswith("s3://")
    for probe in ("readinessProbe", "livenessProbe"):
        assert pod[probe]["httpGet"]["path"] == "/health"
    assert docs["Service"]["spec"]["type"] == "ClusterIP"
    script = (INFRA / "mlflow/entrypoint.sh").read_text()
    for flag in ("--serve-artifacts", "--artifacts-destination", "--app-name basic-auth"):
        assert flag in script
    assert "postgresql" in script and "mlflow[auth]==" in (INFRA / "mlflow/Dockerfile").read_text()
    compose = yaml.safe_load((INFRA / "mlflow/compose.yaml").read_text())["services"]
    assert all("healthcheck" in s for s in compose.values())
    assert compose["mlflow"]["ports"] == ["127.0.0.1:5000:5000"]  # loopback only
    for service in compose.values():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(key):
                assert str(value).startswith("${"), key  # from .env, no literal
    assert ".env" in (REPO / ".gitignore").read_text().split()


def test_mlflow_entrypoint_refuses_to_start_without_its_secrets(tmp_path):
    env = {"PATH": os.environ["PATH"], "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path}/m.db",
           "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "a")}  # fmt: skip
    r = subprocess.run(["sh", INFRA / "mlflow/entrypoint.sh"], env=env, capture_output=True,
                       text=True, timeout=30)  # fmt: skip
    assert r.returncode != 0 and "MLFLOW_ADMIN_PASSWORD" in r.stderr
    assert "basic auth has no default password" in r.stderr


def test_no_literal_secret_anywhere_in_infra():
    """Every `key: value` / `KEY=value` whose key names a secret takes its value from the
    environment (`$...`), a Secret reference (`{...}`) or is left empty (.env.example)."""
    assignment = re.compile(
        r"^\s*(?:-\s*)?(?:export\s+)?([\w.-]*(?:password|secret|token|access_key)[\w.-]*)"
        r"\s*(?::\s|=)\s*(.*)$",
        re.IGNORECASE,
    )
    checked = 0
    for path in sorted(INFRA.rglob("*")):
        if not path.is_file() or path.name == "README.md":
            continue
        for line in path.read_text().splitlines():
            code = line.split("#", 1)[0]
            m = assignment.match(code)
            if not m:
                continue
            checked += 1
            value = m.group(2).strip().strip("'\"")
            assert value == "" or value.startswith(("$", "{")), f"{path.name}: {line.strip()}"
    assert checked >= 10  # the pattern does see the secrets the manifests pass around


# ---------------------------------------------------------------- DVC remote


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["local", "s3"])
def test_dvc_push_and_pull_into_a_fresh_clone_restore_data_and_outputs(
    tmp_path, rng, kind, request
):
    """A local-directory remote, and an S3 remote on a real S3-protocol server (moto) on
    loopback: `dvc push` of the raw data and a prepare stage's output, then a fresh clone
    pulls both and `dvc repro` has nothing to recompute."""
    env = dict(os.environ)
    if kind == "s3":
        s3 = request.getfixturevalue("s3_server")
        env |= s3["env"]

    def dvc(*args, cwd):
        r = subprocess.run(["dvc", *args], cwd=cwd, capture_output=True, text=True, env=env)
        assert r.returncode == 0, (args, r.stdout, r.stderr)
        return r.stdout

    root, remote = tmp_path / "repo", tmp_path / "remote"
    root.mkdir()
    for cls in ("a", "b"):
        for i in range(6):
            save(root / "data" / "toy" / cls / f"{i}.png", random_rgb(rng, 16))
    stage = {
        "cmd": "python -m pipelines.prepare --params params.yaml --name toy --raw data/toy "
        "--out datasets/pyramid/toy",
        "deps": ["data/toy"],
        "params": ["datasets.toy"],
        "outs": ["datasets/pyramid/toy"],
    }
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"prepare": stage}}))
    (root / "params.yaml").write_text(yaml.safe_dump({"datasets": {"toy": {"top_resolution": 8}}}))
    shutil.copytree(
        REPO / "pipelines", root / "pipelines", ignore=shutil.ignore_patterns("__pycache__")
    )
    git(root, "init", "-q")
    dvc("init", "-q", cwd=root)
    if kind == "s3":  # what infra/dvc/remote-s3.sh configures, against the loopback server
        dvc("remote", "add", "-d", "storage", "s3://gm-test/dvc", cwd=root)
        dvc("remote", "modify", "storage", "endpointurl", s3["endpoint"], cwd=root)
    else:
        dvc("remote", "add", "-d", "storage", str(remote), cwd=root)
    dvc("add", "-q", "data", cwd=root)
    dvc("repro", cwd=root)
    git(root, "add", "-A")
    git(root, "commit", "-qm", "data, stage, remote")
    dvc("push", "-q", cwd=root)
    if kind == "s3":
        stored = s3["client"].list_objects_v2(Bucket="gm-test", Prefix="dvc/")
        assert stored.get("KeyCount", 0) > 0
    else:
        assert any(remote.rglob("*"))

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(root), str(clone)], check=True)
    assert not (clone / "data").exists()
    assert not (clone / "datasets/pyramid/toy").exists()  # only its .gitignore is in git
    dvc("pull", "-q", cwd=clone)
    for rel in (
        "data/toy/a/0.png",
        "datasets/pyramid/toy/8x8.parquet",
        "datasets/pyramid/toy/manifest.json",
    ):
        assert (clone / rel).read_bytes() == (root / rel).read_bytes(), rel
    assert "up to date" in dvc("status", cwd=clone)
    out = dvc("repro", cwd=clone)
    assert "Running stage" not in out  # restored, not recomputed
