"""Presets (gm.preset): the ablation section's expansion, the quality preset, what a preset keeps
(its keep section, --keep/--into)."""

from __future__ import annotations

import json

import pytest

from gm import params
from gm.config import yaml_load
from gm.errors import ConfigError
from gm.preset import derive, expand, job_records, keep, kept, main, merge, overrides

from .conftest import REPO


def test_the_quality_preset_expands_into_seed_averaged_ablations_of_three_gan_families():
    from gm.metrics.ablation import ablation_rows

    base = yaml_load((REPO / "params.yaml").read_text())
    preset = yaml_load((REPO / "presets/quality/params.yaml").read_text())
    applied = params.parse(merge(base, derive(base, preset)), "quality")
    names = [n for n in applied.train if "_ab_" in n]
    assert len(names) == 27 and "dcgan_ab_diffaug_s2" in names
    families = {applied.train[n].family for n in names}
    assert families == {"cgan", "dcgan", "progan"}
    evals = [{"name": n, "fid": float(i)} for i, n in enumerate(names)]
    rows = ablation_rows(evals, applied.train)
    # every (family, setting) is one row of three seeds: the groups differ in nothing else
    assert sorted((r["group"], r["setting"], r["n"], tuple(r["seeds"])) for r in rows) == sorted(
        (f"{f}_ab", a, 3, (0, 1, 2)) for f in families for a in ("none", "ada", "diffaug")
    )
    default = params.parse(base)
    longer = {"cgan", "cvae", "ddpm", "aae", "dcgan", "lapgan"}
    # the pipeline's emoji models on digits, trained longer, with the settings of their committed
    # report where the pipeline's jobs have moved on: {model key: (the pipeline's, the report's)}
    lr = ({"lr": 2e-3}, {"lr": 1e-3})
    stylegan_pins = {"optim_g": lr, "optim_d": lr, "architecture": ("resnet", "orig"),
                     "fmap_max": (128, 32)}  # fmt: skip
    on_digits = {
        "progan_digits": ("progan", {"optim_g": lr}),  # D stays at 1e-3 in both
        "stylegan_digits": ("stylegan", stylegan_pins),
    }
    assert "optim_d" not in default.train["progan"].model
    assert set(preset["train"]) == longer | set(on_digits)  # the preset's train section
    for job in longer:  # more steps, the same model
        assert applied.train[job].run.steps > default.train[job].run.steps
        model = dict(default.train[job].model)
        if job in ("dcgan", "cgan"):  # but the paper's lr: the committed report's settings
            model.update(optim_g={"lr": 2e-4}, optim_d={"lr": 2e-4})
        if job == "dcgan":  # and no EMA
            assert (applied.train[job].run.ema_beta, default.train[job].run.ema_beta) == (0, 0.99)
        assert applied.train[job].model == model
    for job, (src, pins) in on_digits.items():
        assert preset["train"][job]["from"] == src
        new, old = applied.train[job], default.train[src]
        model = dict(old.model)
        for key, (pipeline, report) in pins.items():
            assert old.model[key] == pipeline
            model[key] = report
        assert new.family == old.family and new.model == model
        assert new.run.batch_size == old.run.batch_size
        assert (old.dataset, new.dataset, new.resolution) == ("emoji", "digits", 16)
        assert new.run.steps > old.run.steps
    assert set(applied.train) - set(default.train) == set(names) | set(on_digits)


def test_the_committed_quality_reports_are_of_the_jobs_the_preset_makes_today():
    # reports/quality/jobs.json records every job of the run that wrote the reports; a change
    # to params.yaml, to the preset or to a family's defaults that reaches one of those jobs
    # makes the committed reports stale: pin the job in the preset, or rerun it
    recorded = json.loads((REPO / "reports/quality/jobs.json").read_text())["jobs"]
    base = yaml_load((REPO / "params.yaml").read_text())
    preset = derive(base, yaml_load((REPO / "presets/quality/params.yaml").read_text()))
    now = job_records(params.parse(merge(base, preset), "quality"), preset["train"])
    assert sorted(now) == sorted(recorded)
    stale = {job: sorted(k for k in now[job] if now[job][k] != recorded[job][k])
             for job in now if now[job] != recorded[job]}  # fmt: skip
    assert stale == {}, f"jobs whose committed quality reports are of other settings: {stale}"


def test_job_records_fill_in_defaults_so_that_only_a_real_change_shows():
    job = {"family": "progan", "dataset": "emoji", "resolution": 32, "run": {"steps": 10}}
    base = yaml_load((REPO / "params.yaml").read_text())

    def record(**model):
        p = params.parse(merge(base, {"train": {"j": {**job, "model": model}}}))
        return job_records(p, ["j"])["j"]

    plain = record()
    assert plain["model"]["optim_g"] == {"lr": 0.001, "betas": [0.0, 0.99], "eps": 1e-08,
                                         "weight_decay": 0.0, "grad_clip": 0.0}  # fmt: skip
    assert plain["run"]["steps"] == 10 and plain["dataset"] == "emoji"
    assert record(optim_g={"lr": 1e-3}) == plain  # the default written out: the same job
    assert record(optim_g={"lr": 2e-3})["model"]["optim_g"]["lr"] == 0.002
    assert json.loads(json.dumps(plain)) == plain  # JSON values already
    with pytest.raises(ConfigError, match=r"train\.nope: not a train job"):
        job_records(params.parse(base), ["nope"])


def test_make_repro_quality_runs_one_experiment_with_the_generated_jobs(capsys):
    assert main([str(REPO / "presets/quality/params.yaml"), "--params",
                 str(REPO / "params.yaml"), "--dry"]) == 0  # fmt: skip
    cmd, kept_line = capsys.readouterr().out.splitlines()
    assert cmd.startswith("dvc exp run --name quality -S ")
    assert "++train.progan_ab_ada_s1.run.seed=1" in cmd and "ablation" not in cmd
    assert "keep" not in cmd  # the keep section is gm.preset's, no params.yaml entry
    # the grids it keeps are those of the jobs it trains, seed 0 of each ablation setting
    grids = {f"models/{j}/samples.png" for j in ["cgan", "cvae", "ddpm", "aae", "dcgan", "lapgan",
                                                   "progan_digits", "stylegan_digits"]}  # fmt: skip
    grids |= {f"models/{f}_ab_{a}_s0/samples.png" for f in ["cgan", "dcgan", "progan"]
              for a in ["none", "ada", "diffaug"]}  # fmt: skip
    head, _, paths = kept_line.partition(": ")
    assert head == "then keeps in reports/quality"
    assert set(paths.split()) == grids | {
        "reports/summary.md", "reports/summary.json", "reports/eval", "reports/detect"}  # fmt: skip


def test_a_keep_section_derives_the_grids_of_the_jobs_a_preset_trains():
    job = {"family": "dcgan", "dataset": "emoji", "run": {"steps": 10}}
    ab = {"key": "model.augment", "values": ["none", "ada"], "seeds": [3, 4], "jobs": {"d": job}}
    spec = {"into": "out", "paths": ["reports/summary.md"], "samples": True}
    preset = {"train": {"cgan": {"run": {"steps": 5}}}, "ablation": ab, "keep": spec}
    assert kept(preset) == (
        ["reports/summary.md", "models/cgan/samples.png", "models/d_none_s3/samples.png",
         "models/d_ada_s3/samples.png"], "out")  # fmt: skip
    # a job added to the preset is kept with no other list to edit
    preset["train"]["cvae"] = {"run": {"steps": 5}}
    assert "models/cvae/samples.png" in kept(preset)[0]
    assert kept({**preset, "keep": {"into": "out", "paths": ["a"]}}) == (["a"], "out")
    assert kept({"train": {}}) is None
    for bad, match in [
        ({"paths": ["a"]}, "keep: expected the key into"),
        ({"into": "o", "path": ["a"]}, "keep: expected the key into"),
        ({"into": "", "paths": ["a"]}, r"keep\.into: ''"),
        ({"into": "o", "paths": "a"}, r"keep\.paths: 'a'"),
        ({"into": "o", "samples": "yes"}, r"keep\.samples: 'yes': true or false"),
        ({"into": "o"}, "keeps nothing"),
    ]:
        with pytest.raises(ConfigError, match=match):
            kept({"keep": bad}, "p.yaml")
    with pytest.raises(ConfigError, match=r"ablation\.seeds"):  # read only once checked
        kept({**preset, "ablation": {**ab, "seeds": []}}, "p.yaml")


def test_a_derived_job_is_its_source_as_the_preset_leaves_it_with_its_own_keys_changed():
    base = {"train": {"g": {"family": "progan", "dataset": "emoji", "resolution": 32,
                            "model": {"latent": 128, "growth": {"fade_images": 1600}},
                            "run": {"steps": 100, "batch_size": 16}}}}  # fmt: skip
    preset = {"train": {"g": {"run": {"steps": 200}},  # the preset's change to the source
                        "g_digits": {"from": "g", "dataset": "digits", "resolution": 16,
                                     "model": {"growth": {"stable_images": 800}}}}}  # fmt: skip
    out = derive(base, preset)
    assert out["train"]["g_digits"] == {
        "family": "progan", "dataset": "digits", "resolution": 16,
        "model": {"latent": 128, "growth": {"fade_images": 1600, "stable_images": 800}},
        "run": {"steps": 200, "batch_size": 16}}  # fmt: skip
    assert preset["train"]["g_digits"]["from"] == "g"  # the preset itself is left as it was
    # the experiment's overrides spell the derived job out key by key; no `from` reaches DVC
    cmd = overrides(base, out)
    assert "++train.g_digits.model.latent=128" in cmd and not any("from" in o for o in cmd)
    # an ablation job may be derived too: each generated entry is
    ab = {"key": "model.augment", "values": ["none", "ada"], "seeds": [0],
          "jobs": {"g_ab": {"from": "g", "run": {"steps": 50}}}}  # fmt: skip
    gen = derive(base, {"ablation": ab})["train"]  # expanded first
    assert gen["g_ab_ada_s0"]["model"] == {"latent": 128, "growth": {"fade_images": 1600},
                                           "augment": "ada"}  # fmt: skip
    assert gen["g_ab_none_s0"]["run"] == {"steps": 50, "batch_size": 16, "seed": 0}
    assert derive(base, {"train": {"g": {"run": {"steps": 1}}}}) == {"train": {"g": {"run": {
        "steps": 1}}}}  # fmt: skip
    for train, match in [
        ({"h": {"from": "nope"}}, r"train\.h\.from: 'nope': no such train job"),
        ({"h": {"from": ""}}, r"train\.h\.from: '': the name of a train job"),
        ({"h": {"from": "g"}, "k": {"from": "h"}}, r"train\.k\.from: 'h' is itself derived"),
        ({"g": {"from": "g"}}, r"train\.g: a derived job needs a name of its own"),
    ]:
        with pytest.raises(ConfigError, match=match):
            derive(base, {"train": train}, "p.yaml")


def test_a_preset_deriving_from_no_job_is_refused_before_dvc_runs(tmp_path, capsys):
    p = tmp_path / "p.yaml"
    p.write_text("train:\n  x_digits: {from: no_such_job, dataset: digits}\n")
    assert main([str(p), "--params", str(REPO / "params.yaml"), "--dry"]) == 2
    out = capsys.readouterr()
    assert "dvc exp run" not in out.out
    assert f"{p}: train.x_digits.from: 'no_such_job': no such train job" in out.err


def test_ablation_sections_are_checked_naming_the_key():
    job = {"family": "dcgan", "dataset": "emoji", "run": {"steps": 10}}
    ok = {"key": "model.augment", "values": ["none", "ada"], "seeds": [0, 1], "jobs": {"d": job}}
    train = expand({"ablation": ok})["train"]
    assert sorted(train) == ["d_ada_s0", "d_ada_s1", "d_none_s0", "d_none_s1"]
    assert train["d_ada_s1"]["model"]["augment"] == "ada" and train["d_ada_s1"]["run"] == {
        "steps": 10, "seed": 1}  # fmt: skip
    assert "model" not in job  # the section's own job is left as it was
    assert "keep" not in expand({"ablation": ok, "keep": {"into": "o", "samples": True}})
    for bad, match in [
        ({**ok, "key": "run.seed"}, r"ablation\.key: 'run\.seed'"),
        ({**ok, "values": ["none", "none"]}, r"ablation\.values: .*distinct"),
        ({**ok, "seeds": [0, -1]}, r"ablation\.seeds: .*integers >= 0"),
        ({**ok, "jobs": {}}, r"ablation\.jobs: a mapping"),
        ({k: v for k, v in ok.items() if k != "seeds"}, "exactly the keys"),
    ]:
        with pytest.raises(ConfigError, match=match):
            expand({"ablation": bad}, "p.yaml")
    with pytest.raises(ConfigError, match="d_none_s0 is also a train entry"):
        expand({"ablation": ok, "train": {"d_none_s0": job}})


def test_keep_copies_outputs_into_a_folder_replaced_whole(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "reports/eval").mkdir(parents=True)
    (tmp_path / "reports/eval/a.json").write_text("{}")
    (tmp_path / "reports/summary.md").write_text("# s")
    (tmp_path / "models/cgan").mkdir(parents=True)
    (tmp_path / "models/cgan/samples.png").write_bytes(b"png")
    into = tmp_path / "reports/quality"
    into.mkdir()
    (into / "stale.txt").write_text("old")
    keep(["reports/summary.md", "reports/eval", "models/cgan/samples.png"], "reports/quality",
         files={"jobs.json": "{}\n"})  # fmt: skip
    assert sorted(str(p.relative_to(into)) for p in into.rglob("*") if p.is_file()) == [
        "cgan/samples.png", "eval/a.json", "jobs.json", "summary.md"]  # fmt: skip
    assert (into / "jobs.json").read_text() == "{}\n"
    with pytest.raises(ConfigError, match="same destination"):  # a file over a kept path
        keep(["reports/summary.md"], "reports/quality", files={"summary.md": "x"})
    assert not list(tmp_path.glob("reports/.quality*"))  # no temporary folder left
    with pytest.raises(ConfigError, match="nope: no such file"):
        keep(["reports/summary.md", "nope"], "reports/quality")
    (tmp_path / "models/eval").mkdir()
    with pytest.raises(ConfigError, match="same destination"):
        keep(["reports/eval", "models/eval"], "reports/quality")
    assert (into / "summary.md").read_text() == "# s"  # a refused keep changes nothing
    p = tmp_path / "params.yaml"
    p.write_text((REPO / "params.yaml").read_text())
    with pytest.raises(SystemExit) as e:  # argparse's usage error
        main([str(REPO / "presets/quality/params.yaml"), "--params", str(p), "--dry",
              "--keep", "reports/summary.md"])  # fmt: skip
    assert e.value.code == 2
    assert "--keep and --into go together" in capsys.readouterr().err


def test_a_preset_run_keeps_its_reports_with_the_jobs_it_trained(tmp_path, monkeypatch, capsys):
    import shlex
    import subprocess
    import sys

    import yaml

    from .conftest import git

    root = tmp_path / "proj"
    root.mkdir()
    (root / "params.yaml").write_text((REPO / "params.yaml").read_text())
    write = "import yaml,pathlib; s=yaml.safe_load(open('params.yaml'))['train']['cgan']['run']"
    write += "['steps']; pathlib.Path('reports').mkdir(exist_ok=True); "
    write += "pathlib.Path('reports/summary.md').write_text(f'steps {s}')"
    stage = {"cmd": f'{shlex.quote(sys.executable)} -c "{write}"',
             "params": ["train.cgan.run.steps"], "outs": ["reports/summary.md"]}  # fmt: skip
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"report": stage}}))
    git(root, "init", "-q")
    subprocess.run(["dvc", "init", "-q"], cwd=root, check=True)
    git(root, "add", "-A")
    git(root, "commit", "-qm", "init")
    preset = tmp_path / "preset.yaml"  # outside the repository: the tree stays clean
    preset.write_text("train: {cgan: {run: {steps: 7}}}\n"
                      "keep: {into: reports/kept, paths: [reports/summary.md]}\n")  # fmt: skip
    monkeypatch.chdir(root)
    assert main([str(preset), "--name", "t"]) == 0
    assert "kept 1 paths in reports/kept" in capsys.readouterr().out
    assert (root / "reports/kept/summary.md").read_text() == "steps 7"  # the experiment's
    doc = json.loads((root / "reports/kept/jobs.json").read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                          text=True, check=True).stdout.strip()  # fmt: skip
    assert (doc["commit"], doc["dirty"], doc["preset"]) == (head, "false", str(preset))
    assert list(doc["jobs"]) == ["cgan"] and doc["jobs"]["cgan"]["run"]["steps"] == 7
    base = yaml_load((REPO / "params.yaml").read_text())
    applied = params.parse(merge(base, {"train": {"cgan": {"run": {"steps": 7}}}}))
    assert doc["jobs"] == job_records(applied, ["cgan"])
