"""Audit MLflow runs: list and compare them, and check one against the workspace.

A training run carries its lineage as tags (``gm.tracking.lineage_tags``): the git commit and
dirty flag, the ``data.dvc`` hash, the hash DVC computes for each of the stage's dependencies,
the job and its params section, and the SHA-256 of the checkpoint it wrote. ``audit`` compares
each of them with the workspace as it is now, and turns the run's params into the commands
that reproduce it: ``git checkout``, ``dvc checkout`` and ``dvc repro`` when the params are
the commit's own, or ``dvc exp run -S`` with exactly the values that differ from them.

Works against any tracking store: the default ``sqlite:///<root>/mlflow.db`` or a server
(``MLFLOW_TRACKING_URI``).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gm import tracking
from gm.config import yaml_load
from gm.errors import ConfigError, GmError

# Columns of `gm runs`: the metrics a user compares first, in this order, when present.
KEY_METRICS = (
    "eval/fid",
    "eval/kid",
    "eval/bits_per_dim",
    "eval/conditional_accuracy",
    "kid",
    "psnr",
    "rd/psnr",
    "rd/bpp",
)
KEY_PARAMS = ("family", "dataset", "run.steps", "run.batch_size")
# The run params that come from the job's entry in params.yaml (the others, data.* and the
# schedule, are derived from the dataset).
JOB_PARAM_PREFIXES = ("family", "dataset", "resolution", "model.", "run.")


def _client(root: Path):
    from mlflow import MlflowClient

    uri = tracking.tracking_uri(root)
    tracking.check_store(uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise GmError(f"{uri}: no MLflow store here (run `dvc repro`, or set MLFLOW_TRACKING_URI)")
    return MlflowClient(uri), uri


def list_runs(
    root: str | Path,
    experiment: str = tracking.EXPERIMENT,
    filter_string: str = "",
    max_results: int = 50,
) -> list[dict[str, Any]]:
    """Runs of ``experiment``, newest first, as rows of plain values."""
    from mlflow.exceptions import MlflowException

    client, uri = _client(Path(root))
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise GmError(f"{uri}: no experiment named {experiment!r}")
    try:
        runs = client.search_runs(
            [exp.experiment_id],
            filter_string=filter_string,
            max_results=max_results,
            order_by=["attributes.start_time DESC"],
        )
    except MlflowException as e:
        raise ConfigError(f"--filter {filter_string!r}: {e.message}") from None
    rows = []
    for r in runs:
        t, p, m = r.data.tags, tracking.effective_params(r), r.data.metrics
        prepared = next((v for k, v in t.items() if k.startswith("dvc.dep.datasets/")), "")
        inputs = getattr(r.inputs, "dataset_inputs", None) or []
        if not prepared and inputs:  # a `gm train` run: the digest it logged with its input
            prepared = inputs[0].dataset.digest
        rows.append(
            {
                "run_id": r.info.run_id,
                "name": r.info.run_name,
                "status": r.info.status,
                "commit": t.get("git.commit", "")[:8]
                + ("+dirty" if t.get("git.dirty") == "true" else ""),  # fmt: skip
                "data": (t.get("dvc.data") or "")[:8],  # data.dvc: the raw data
                "prepared": prepared[:8],  # the prepared dataset it trained on
                "params": {k: p[k] for k in KEY_PARAMS if k in p},
                "metrics": {k: m[k] for k in KEY_METRICS if k in m},
            }
        )
    return rows


def render_runs(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table: one row per run, the key params and metrics as columns."""
    if not rows:
        return "no runs"
    params = [k for k in KEY_PARAMS if any(k in r["params"] for r in rows)]
    metrics = [k for k in KEY_METRICS if any(k in r["metrics"] for r in rows)]
    head = ["run", "name", "status", "commit", "data.dvc", "prepared", *params, *metrics]
    body = []
    for r in rows:
        body.append(
            [
                r["run_id"][:12],
                r["name"],
                r["status"].lower(),
                r["commit"],
                r["data"] or "-",
                r["prepared"] or "-",
                *(r["params"].get(k, "") for k in params),
                *(_fmt(r["metrics"][k]) if k in r["metrics"] else "" for k in metrics),
            ]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip()
             for row in [head, *body]]  # fmt: skip
    return "\n".join(lines)


def compare_runs(root: str | Path, run_ids: list[str]) -> str:
    """Params and metrics of several runs side by side: only the keys whose values differ."""
    client, _ = _client(Path(root))
    runs = [_get_run(client, rid) for rid in run_ids]
    out = ["  ".join(["key", *(r.info.run_id[:12] for r in runs)])]
    tables = {"params": [tracking.effective_params(r) for r in runs],
              "metrics": [r.data.metrics for r in runs]}  # fmt: skip
    for kind, table in tables.items():
        keys = sorted(set().union(*table))
        for k in keys:
            values = [row.get(k) for row in table]
            if len({str(v) for v in values}) > 1:
                shown = [_fmt(v) if isinstance(v, float) else str(v or "-") for v in values]
                out.append("  ".join([f"{kind[:-1]} {k}", *shown]))
    if len(out) == 1:
        out.append("(no params or metrics differ)")
    return "\n".join(out)


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def _get_run(client, run_id: str):
    """The run whose id is ``run_id`` or starts with it (the 12 characters `gm runs` prints,
    or fewer). Raises GmError when no run matches, or when a prefix matches several."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        pass
    ref = run_id.strip().lower()
    if ref and all(c in "0123456789abcdef" for c in ref):
        matches = [r for r in _all_runs(client) if r.info.run_id.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        if matches:
            shown = ", ".join(f"{r.info.run_id[:12]} ({r.info.run_name})" for r in matches[:6])
            more = " …" if len(matches) > 6 else ""
            raise GmError(f"run {run_id}: ambiguous, {len(matches)} runs start with it: "
                          f"{shown}{more}; give more characters")  # fmt: skip
    raise GmError(f"run {run_id}: not found in {client.tracking_uri}")


def _all_runs(client):
    """Every run of every experiment (active or deleted), page by page."""
    from mlflow.entities import ViewType

    ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    token = None
    while ids:
        page = client.search_runs(ids, run_view_type=ViewType.ALL, max_results=1000,
                                  page_token=token)  # fmt: skip
        yield from page
        token = page.token
        if not token:
            break


@dataclass
class Check:
    what: str
    run: str
    workspace: str
    ok: bool | None  # None: cannot tell (not recorded)


@dataclass
class Audit:
    run_id: str
    name: str
    status: str
    uri: str
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]
    artifacts: list[str]
    checks: list[Check] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def matches(self) -> bool:
        """True when every recorded hash equals the workspace's."""
        return all(c.ok is not False for c in self.checks) and any(c.ok for c in self.checks)

    def differing(self) -> list[str]:
        return [c.what for c in self.checks if c.ok is False]


def _list_artifacts(client, run_id: str, path: str | None = None, depth: int = 2) -> list[str]:
    out = []
    for f in client.list_artifacts(run_id, path):
        if f.is_dir and depth > 1:
            out += _list_artifacts(client, run_id, f.path, depth - 1)
        else:
            out.append(f.path + ("/" if f.is_dir else ""))
    return out


def job_params(raw: dict[str, Any], job: str, source: str) -> tuple[str, dict[str, str]]:
    """(section, the MLflow params ``run_job`` logs for ``job``'s entry, without data.*) of a
    params.yaml content: what a run's params are compared with."""
    from gm import params as gm_params
    from gm.config import to_dict

    p = gm_params.parse(raw, source)
    try:
        section, cfg = p.job(job)
    except KeyError:
        raise ConfigError(f"{source}: no training job {job!r}") from None
    flat = tracking.flatten(
        {
            "family": cfg.family,
            "dataset": cfg.data_name,
            "model": to_dict(cfg.family_config(f"{section}.{job}")),
            "run": to_dict(cfg.run),
        }
    )
    return section, flat


def _job_keys(params: dict[str, str]) -> dict[str, str]:
    """The run params that come from the job's entry. ``run.init_from`` is logged resolved to
    an absolute path; the file's SHA-256 (tag ``file.init_from.sha256``) identifies it."""
    return {
        k: v for k, v in params.items()
        if k.startswith(JOB_PARAM_PREFIXES) and k != "run.init_from"
    }  # fmt: skip


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=60)


def _code_check(root: Path, commit: str, head: str, deps: dict[str, str]) -> Check:
    """The run's commit against HEAD. A later commit still matches when no file it changed is
    the stage's command (dvc.yaml) or under one of its dependencies (their content is checked
    by hash anyway); params.yaml is compared by value, dvc.lock is DVC's record. A run with no
    recorded dependencies (trained outside DVC) needs HEAD to be its commit."""
    if not head:
        return Check("git commit", commit, "(no git)", False)
    if head == commit:
        return Check("git commit", commit, head, True)
    if _git(root, "merge-base", "--is-ancestor", commit, head).returncode != 0:
        return Check("git commit (HEAD does not descend from it)", commit, head, False)
    changed = _git(root, "diff", "--name-only", commit, head).stdout.split()
    ignored = {"dvc.lock", "params.yaml"}
    if deps:
        prefixes = [d.rstrip("/") for d in deps if d not in ignored]
        relevant = [
            f for f in changed
            if f == "dvc.yaml" or any(f == d or f.startswith(d + "/") for d in prefixes)
        ]  # fmt: skip
    else:
        relevant = [f for f in changed if f not in ignored]
    what = f"git commit (HEAD {head[:8]} is later; " + (
        f"changed since: {', '.join(relevant[:5])})" if relevant
        else "nothing the stage depends on changed since)"
    )  # fmt: skip
    return Check(what, commit, head, not relevant)


def _set_value(text: str) -> str:
    """A run param's string as the value `dvc exp run -S` (Hydra's override grammar) parses
    back to the same value."""
    value = yaml_load(text) if text not in ("None", "") else None
    if text in ("True", "False"):
        value = text == "True"
    return _flow(value)


def _flow(value: Any) -> str:
    """A YAML value in Hydra's override grammar: flow style, strings quoted unless plain
    (an unquoted comma would make a sweep of them, a space or a colon another value)."""
    plain = isinstance(value, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_./-]*", value)
    if isinstance(value, str) and not (plain and yaml_load(value) == value):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, list):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...")


def dvc_override(params: Any, key: str, value: str | None) -> str:
    """One ``dvc exp run -S`` override that DVC accepts for ``params`` (the commit's
    params.yaml): ``key=value`` for a key it has, ``++key=value`` for one it lacks (DVC
    refuses a plain ``key=`` there), ``~key`` for a key to remove (``value`` None)."""
    if value is None:
        return f"~{key}"
    try:
        tracking.subtree(params, key)
        return f"{key}={value}"
    except KeyError:
        return f"++{key}={value}"


def audit_run(root: str | Path, run_id: str) -> Audit:
    """Lineage of ``run_id``, its checks against the workspace and the commands reproducing it."""
    root = Path(root).resolve()
    client, uri = _client(root)
    run = _get_run(client, run_id)
    t, p = dict(run.data.tags), tracking.effective_params(run)
    a = Audit(
        run.info.run_id,
        run.info.run_name,
        run.info.status,
        uri,
        t,
        p,
        dict(run.data.metrics),
        _list_artifacts(client, run.info.run_id),
    )
    now = tracking.lineage_tags(root)

    # Code: the run's commit, or a later one that changed nothing the stage depends on.
    stage = t.get("dvc.stage")
    recorded = {k.removeprefix("dvc.dep."): v for k, v in t.items() if k.startswith("dvc.dep.")}
    recorded.pop("params.yaml", None)  # older runs hashed the whole file: compared by value below
    if "git.commit" in t:
        a.checks.append(_code_check(root, t["git.commit"], now.get("git.commit", ""), recorded))
        if t.get("git.dirty") == "true":
            a.notes.append(
                "the run was made from a workspace with uncommitted changes (as `dvc exp run "
                "-S` makes them): the commit alone does not reproduce it, the commands below do"
            )
        if now.get("git.dirty") == "true":
            names = tracking.uncommitted_changes(root)
            a.notes.append(f"the workspace has uncommitted changes: {', '.join(names[:8])}")
    # Raw data.
    if "dvc.data" in t:
        a.checks.append(Check("data.dvc", t["dvc.data"], now.get("dvc.data", "(none)"),
                              t["dvc.data"] == now.get("dvc.data")))  # fmt: skip
    # The stage's dependencies, as DVC hashes them.
    if stage and recorded:
        current = tracking.stage_dep_hashes(root, stage)
        for path, h in sorted(recorded.items()):
            cur = current.get(path, "(missing)")
            a.checks.append(Check(f"dep {path}", h, cur, h == cur))
    # The output it wrote.
    out, sha = t.get("gm.out"), t.get("gm.checkpoint.sha256")
    if out and sha:
        from gm.io import sha256_file

        ckpt = root / out / "checkpoint.pt"
        cur = sha256_file(ckpt) if ckpt.is_file() else "(missing)"
        a.checks.append(Check(f"output {out}/checkpoint.pt", sha, cur, sha == cur))

    job, section = t.get("gm.job"), t.get("gm.section")
    if job and not section and stage and "@" in stage:
        section = stage.split("@")[0]
    # Params: the job's entry in the workspace's params.yaml, then at the run's commit.
    overrides: list[tuple[str, str]] = []  # (the job's own key, its value) for -S / --set
    upstream: list[str] = []  # -S overrides of params upstream stages read
    commit = t.get("git.commit")
    if job:
        logged = _job_keys(p)
        try:
            raw = yaml_load((root / "params.yaml").read_text()) or {}
            section, here = job_params(raw, job, "params.yaml")
            diff = sorted(k for k in logged if here.get(k) != logged[k])
            for k in diff:
                a.checks.append(Check(f"params.yaml {section}.{job}.{k}", logged[k],
                                      here.get(k, "(absent)"), False))  # fmt: skip
            if not diff:
                a.checks.append(Check(f"params.yaml {section}.{job}", "", "", True))
        except (GmError, OSError) as e:
            a.notes.append(f"params.yaml: cannot compare with the run ({e})")
    commit_params: Any = None
    if commit and (job or "dvc.upstream_params" in t):
        shown = _git(root, "show", f"{commit}:params.yaml")
        if shown.returncode == 0:
            commit_params = yaml_load(shown.stdout) or {}
        else:
            a.notes.append(f"commit {commit[:8]} is not in this repository (git fetch it)")
    if job and commit_params is not None:
        try:
            section, then = job_params(commit_params, job, f"{commit[:8]}:params.yaml")
            overrides = [(k, _set_value(v)) for k, v in sorted(logged.items())
                         if then.get(k) != v]  # fmt: skip
        except GmError as e:
            a.notes.append(f"the commit's params.yaml cannot be read by this gm ({e})")
    if commit_params is not None and "dvc.upstream_params" in t:
        changed = json.loads(t["dvc.upstream_params"])
        upstream = [dvc_override(commit_params, k, _flow(v))
                    for k, v in sorted(changed.get("set", {}).items())]  # fmt: skip
        upstream += [dvc_override(commit_params, k, None) for k in changed.get("removed", [])]
        a.notes.append("the run was made with upstream params changed (" + ", ".join(upstream)
                       + "): the command reruns the stages upstream of it too")  # fmt: skip

    # The commands: `dvc checkout` restores the inputs at that commit; --force retrains even
    # where DVC's run-cache holds the outputs, --single-item reruns only this stage.
    if commit:
        a.commands.append(f"git checkout {commit}")
        a.commands.append("dvc checkout")
        a.notes.append("on a fresh clone, `dvc pull` instead of `dvc checkout` fetches the "
                       "data and outputs from the DVC remote")  # fmt: skip
    sets = [dvc_override(commit_params, f"{section}.{job}.{k}", v) for k, v in overrides]
    sets += upstream
    flags = " ".join(f"-S {shlex.quote(x)}" for x in sets)
    if stage and upstream:  # no --single-item: the changed upstream stages must rerun too
        a.commands.append(f"dvc exp run --force {shlex.quote(stage)} {flags}")
    elif stage and sets:
        a.commands.append(f"dvc exp run --force --single-item {shlex.quote(stage)} {flags}")
    elif stage:
        a.commands.append(f"dvc repro --force --single-item {shlex.quote(stage)}")
    elif job:
        flags = " ".join(f"--set {shlex.quote(f'{k}={v}')}" for k, v in overrides)
        a.commands.append(f"gm train {job} {flags}".rstrip())
    return a


def _short(value: str) -> str:
    """A hash (git commit, DVC md5, SHA-256) cut to 16 characters; any other value whole."""
    if len(value) > 16 and all(c in "0123456789abcdef" for c in value):
        return value[:16]
    return value


def render_audit(a: Audit) -> str:
    t = a.tags
    lines = [
        f"run {a.run_id}  {a.name}  {a.status.lower()}  ({a.uri})",
        f"  job        {t.get('gm.job', '-')}   stage {t.get('dvc.stage', '-')}   "
        f"gm {t.get('gm.version', '-')}",
        f"  git        {t.get('git.commit', '-')}"
        + ("  (dirty)" if t.get("git.dirty") == "true" else ""),  # fmt: skip
        f"  data.dvc   {t.get('dvc.data', '-')}",
    ]
    for k, v in sorted(t.items()):
        if k.startswith("dvc.dep."):
            lines.append(f"  dep        {k.removeprefix('dvc.dep.')}  {v}")
    if a.params:
        lines.append("params")
        lines += [f"  {k} = {v}" for k, v in sorted(a.params.items())]
    if a.metrics:
        lines.append("metrics (latest)")
        lines += [f"  {k} = {_fmt(v)}" for k, v in sorted(a.metrics.items())]
    if a.artifacts:
        lines.append("artifacts")
        lines += [f"  {x}" for x in a.artifacts]
    lines.append("workspace")
    for c in a.checks:
        mark = {True: "ok  ", False: "DIFF", None: "?   "}[c.ok]
        extra = "" if c.ok else f"  run {_short(c.run)}  workspace {_short(c.workspace)}"
        lines.append(f"  {mark} {c.what}{extra}")
    verdict = "matches this run" if a.matches else (
        "differs: " + ", ".join(a.differing()) if a.differing() else "nothing recorded to check"
    )  # fmt: skip
    lines.append(f"  → the workspace {verdict}")
    for n in a.notes:
        lines.append(f"note: {n}")
    lines.append("reproduce")
    lines += [f"  {c}" for c in a.commands]
    return "\n".join(lines)
