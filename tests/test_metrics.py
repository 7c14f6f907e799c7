"""Evaluation metrics: sanity properties of FID/KID/precision-recall, the registry, the domain
classifier, and a whole evaluation of a trained checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from gm.errors import ConfigError, DataError
from gm.metrics import quality
from gm.metrics.classifier import (
    ClassifierConfig,
    load_classifier,
    save_classifier,
    train_classifier,
)
from gm.metrics.evaluate import EvalConfig


def gaussian(n, d=16, seed=0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) + shift


def test_fid_and_kid_of_a_set_against_itself_are_zero():
    x = gaussian(400)
    assert abs(quality.fid(x, x)) < 1e-6
    mean, _ = quality.kid(x, x)
    assert abs(mean) < 0.05


def test_fid_and_kid_grow_with_noise():
    x = gaussian(500)
    fids, kids = [], []
    for sigma in (0.0, 0.3, 0.6, 1.2):
        noisy = x + sigma * gaussian(500, seed=1)
        fids.append(quality.fid(x, noisy))
        kids.append(quality.kid(x, noisy)[0])
    assert fids == sorted(fids) and fids[-1] > fids[0] + 1
    assert kids == sorted(kids) and kids[-1] > kids[0]


def test_kid_is_unbiased_for_two_samples_of_one_distribution():
    means = [quality.kid(gaussian(300, seed=s), gaussian(300, seed=100 + s))[0] for s in range(5)]
    avg = sum(means) / len(means)
    spread = quality.kid(gaussian(300, seed=7), gaussian(300, seed=8))[1]
    assert abs(avg) < 2 * spread  # centred on zero, unlike the biased estimator (always > 0)
    biased = quality.kid(gaussian(300), gaussian(300, seed=1, shift=0.5))[0]
    assert biased > 5 * abs(avg)  # and it does see a real difference


def test_precision_recall_extremes():
    x = gaussian(200)
    assert quality.precision_recall(x, x) == (1.0, 1.0)
    far = gaussian(200, seed=1, shift=100.0)
    assert quality.precision_recall(x, far) == (0.0, 0.0)
    half = torch.cat([x[:100], far[:100]])  # half the fakes are off the real manifold
    p, _ = quality.precision_recall(x, half)
    assert 0.4 <= p <= 0.6


def test_registry_rejects_unknown_metric_with_the_known_ones():
    with pytest.raises(ConfigError, match="unknown metric 'fiid'.*fid, kid"):
        quality.get("fiid")
    with pytest.raises(ConfigError, match="unknown metric"):
        EvalConfig(metrics=("fid", "fiid"))


def test_psnr_and_ssim_of_an_image_with_itself_are_capped_and_drop_with_noise():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    assert quality.psnr(x, x) == quality.PSNR_CAP and quality.ssim(x, x) == pytest.approx(1.0)
    values = []
    for sigma in (0.01, 0.05, 0.2):
        noisy = (x + sigma * torch.randn_like(x)).clamp(-1, 1)
        values.append((quality.psnr(noisy, x), quality.ssim(noisy, x)))
    assert values[0][0] > values[1][0] > values[2][0] and values[0][1] > values[1][1] > values[2][1]
    # sigma 0.05 on a range of 2 is about 20*log10(2/0.05) = 32 dB
    assert 30 < values[1][0] < 34
    # luma and a cropped border are what SR papers report; a 2-pixel border ignores edge errors
    edge = x.clone()
    edge[..., :2, :] = -x[..., :2, :]
    assert quality.psnr(edge, x, border=2) == quality.PSNR_CAP
    assert quality.psnr(edge, x, y_channel=True) < quality.PSNR_CAP
    with pytest.raises(Exception, match="output shape"):
        quality.psnr(x[:, :, :16], x)


def test_paired_metrics_in_the_registry_sit_beside_their_baseline():
    torch.manual_seed(0)
    target = torch.rand(3, 3, 16, 16) * 2 - 1
    sets = quality.EvalSets(*(torch.zeros(2, 2),) * 4, None, torch.zeros(2, 2))
    assert quality.get("psnr")(sets) == {}  # unpaired models: nothing to report
    sets.paired_target = target
    sets.paired_output = (target + 0.01 * torch.randn_like(target)).clamp(-1, 1)
    sets.paired_baseline = (target + 0.1 * torch.randn_like(target)).clamp(-1, 1)
    r = quality.get("psnr")(sets) | quality.get("ssim")(sets)
    assert r["psnr"] > r["psnr_baseline"] and r["ssim"] > r["ssim_baseline"]


def test_domain_classifier_learns_digits_and_round_trips(digits, tmp_path):
    cfg = ClassifierConfig(width=8, features=32, steps=250, batch_size=64, lr=0.003)
    net, report = train_classifier(digits, 16, cfg, progress=False)
    assert report["test_accuracy"] >= 0.9  # the stated accuracy on the real test split
    assert report["num_classes"] == 10 and report["chance_accuracy"] == 0.1
    save_classifier(tmp_path / "c.pt", net, cfg, report)
    again, desc = load_classifier(tmp_path / "c.pt")
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    assert torch.equal(net(x), again(x)) and len(desc["sha256"]) == 64
    (tmp_path / "bad.pt").write_bytes((tmp_path / "c.pt").read_bytes()[:100])
    with pytest.raises(Exception, match="bad.pt: not a readable classifier"):
        load_classifier(tmp_path / "bad.pt")


def test_classifier_learns_lower_levels_as_evaluation_shows_them(digits, tmp_path):
    """With ``levels``, the classifier also learns 8x8 images upsampled to 16x16 as evaluation
    shows an 8x8 model's samples: it reports its accuracy per level, classifies those better
    than a classifier that never saw them, and evaluation says which case a model is in."""
    from gm.config import from_dict
    from gm.data.readers import to_unit_range
    from gm.errors import ConfigError
    from gm.metrics.classifier import present
    from gm.metrics.evaluate import evaluate_checkpoint, split_store
    from gm.registry import families
    from gm.train.checkpoint import save_checkpoint
    from gm.train.loop import Trainer
    from gm.train.protocol import DataInfo

    with pytest.raises(ConfigError, match="levels: 12 is not a power of two"):
        ClassifierConfig(levels=(12,))
    accuracy = {}
    for levels in ((), (8,)):
        cfg = ClassifierConfig(width=8, features=32, steps=150, batch_size=64, lr=0.003,
                               levels=levels)  # fmt: skip
        net, report = train_classifier(digits, 16, cfg, progress=False)
        save_classifier(tmp_path / f"c{len(levels)}.pt", net, cfg, report)
        test = split_store(digits, 8, "test")
        with torch.no_grad():
            x = present(to_unit_range(next(test.batches(None, 10_000))[0]), 16)
            accuracy[levels] = (net(x).argmax(1) == test.labels).float().mean().item()
    assert set(report["test_accuracy_by_level"]) == {"8", "16"}
    # (batches of other sizes may flip an argmax at a tie: at most one image here or there)
    assert report["test_accuracy_by_level"]["8"] == pytest.approx(accuracy[(8,)], abs=0.012)
    assert report["test_accuracy_by_level"]["16"] == report["test_accuracy"] >= 0.85
    assert accuracy[(8,)] > accuracy[()] + 0.02, accuracy
    fam = families()["cvae"]
    mcfg = from_dict(fam.config, {"z_dim": 4, "width": 8, "embed_dim": 4}, "cvae")
    info = DataInfo(8, 1, 10)
    save_checkpoint(tmp_path / "m.pt", "cvae", mcfg, info,
                    Trainer(fam.build(mcfg, info)).state_dict())  # fmt: skip
    ev = EvalConfig(num_samples=50, metrics=("conditional_accuracy",), bootstrap=0)
    for n, learned in ((1, "a level the classifier learned"), (0, "never saw")):
        r = evaluate_checkpoint(tmp_path / "m.pt", tmp_path / f"c{n}.pt", digits, ev)
        assert r["conditional_presentation"].startswith("8x8 resized to 16x16, ")
        assert learned in r["conditional_presentation"]
        assert r["conditional_accuracy_baseline"] == pytest.approx(accuracy[(8,) * n], abs=0.012)


def test_evaluation_of_a_checkpoint_sits_beside_its_baseline(digits, tmp_path):
    from gm.config import from_dict
    from gm.metrics.evaluate import evaluate_checkpoint, unavailable_warning
    from gm.registry import families
    from gm.train.checkpoint import save_checkpoint
    from gm.train.loop import Trainer
    from gm.train.protocol import DataInfo

    cfg = ClassifierConfig(width=8, features=32, steps=100, batch_size=64)
    net, report = train_classifier(digits, 16, cfg, progress=False)
    save_classifier(tmp_path / "c.pt", net, cfg, report)
    fam = families()["cvae"]
    mcfg = from_dict(fam.config, {"z_dim": 4, "width": 8, "embed_dim": 4}, "cvae")
    info = DataInfo(16, 1, 10)
    trainer = Trainer(fam.build(mcfg, info))
    save_checkpoint(tmp_path / "m.pt", "cvae", mcfg, info, trainer.state_dict())
    ev = EvalConfig(num_samples=200)
    r = evaluate_checkpoint(tmp_path / "m.pt", tmp_path / "c.pt", digits, ev,
                            samples_path=tmp_path / "s.parquet")  # fmt: skip
    # An untrained model is far from the data; real train images are close to real test ones.
    assert r["fid"] > 2 * r["fid_baseline"] and r["kid"] > r["kid_baseline"]
    # enough images (171 test): every metric a number with its interval, nothing withheld
    assert "unavailable" not in r and unavailable_warning(r) is None
    assert r["fid_ci_low"] < r["fid"] < r["fid_ci_high"]
    assert r["precision"] < r["precision_baseline"]
    assert 0.0 <= r["conditional_accuracy"] <= 0.5  # about chance for an untrained model
    assert r["bits_per_dim"] > 0 and r["num_samples"] == 200
    assert r["extractor"]["resize"] == "none" and r["extractor"]["sha256"]
    # its real baseline: the classifier on the real test images, shown as the samples are (at
    # its own resolution here: its reported test accuracy)
    assert r["conditional_accuracy_baseline"] == pytest.approx(report["test_accuracy"])
    assert r["conditional_presentation"] == "16x16: the classifier's resolution"
    # the samples it scored, kept for the detect stage: 8-bit, labelled, split 6/2/2
    from gm.detect import open_samples

    kept = open_samples(tmp_path / "s.parquet")
    sizes = {k: len(v) for k, v in kept.splits.items()}
    assert sizes == {"train": 120, "val": 40, "test": 40} and kept.resolution == 16
    assert kept.meta["family"] == "cvae" and kept.meta["step"] == 0
    assert sorted(kept.splits["train"].labels.unique().tolist()) == list(range(10))


def _rank0_only_metrics(rank, port, out):
    import os

    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    if rank == 0:  # as in training: rank 0 alone computes the in-training KID
        x, y = gaussian(60), gaussian(60, seed=1)
        torch.save(torch.tensor([quality.kid(x, y)[0], quality.fid(x, y)]), f"{out}/metrics.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_metrics_on_one_rank_of_a_process_group_do_not_wait_for_the_others(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank0_only_metrics, args=(port, str(tmp_path)), nprocs=2, join=True)
    values = torch.load(tmp_path / "metrics.pt")
    assert torch.isfinite(values).all()


def _made_inception(tmp_path_factory, fid: bool):
    """Inception-v3 weights made here (random init): torchvision's state-dict format (1000
    classes, auxiliary head) or the FID Inception's (1008 classes, pt_inception-2015-12-05's
    layout, which torch-fidelity and pytorch-fid load)."""
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    net = inception_v3(weights=None, aux_logits=not fid, init_weights=True,
                       num_classes=1008 if fid else 1000)  # fmt: skip
    for m in net.modules():  # calibrate batch norm so activations stay O(1), like trained weights
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        net.train()(torch.rand(4, 3, 299, 299) * 2 - 1)
        net.fc.weight.mul_(1e-3)  # moderate logits, so that softmax never underflows
    net.eval()
    name = "pt_inception.pth" if fid else "inception_v3.pth"
    path = tmp_path_factory.mktemp("inception") / name
    torch.save(net.state_dict(), path)
    return path, net


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    return _made_inception(tmp_path_factory, fid=False)


@pytest.fixture(scope="module")
def fid_inception_weights(tmp_path_factory):
    return _made_inception(tmp_path_factory, fid=True)


def test_inception_loads_local_weights_and_matches_torchvision(inception_weights, tmp_path):
    from gm.io import sha256_file
    from gm.metrics.inception import load_inception

    path, reference = inception_weights
    net, desc = load_inception(path)
    assert desc["kind"] == "inception-v3" and desc["sha256"] == sha256_file(path)
    x = torch.rand(2, 1, 32, 32) * 2 - 1  # grey, small: repeated to RGB and resized to 299
    feats = net.features(x)
    assert feats.shape == (2, 2048)
    big = torch.nn.functional.interpolate(
        x.expand(-1, 3, -1, -1), size=(299, 299), mode="bilinear", antialias=True
    )
    with torch.no_grad():
        assert torch.allclose(net.head(feats), reference(big), atol=1e-5)
    not_inception = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, not_inception)
    with pytest.raises(Exception, match="other.pth: not torchvision's inception_v3"):
        load_inception(not_inception)
    with pytest.raises(ConfigError, match="missing.pth does not exist"):
        load_inception(tmp_path / "missing.pth")


def test_fid_inception_weights_run_torch_fidelity_network_with_the_clean_resize(
    fid_inception_weights, tmp_path
):
    """A 1008-class file is the FID Inception: its features are torch-fidelity's own (the
    network papers' FIDs use) on 299x299 8-bit images, smaller images are resized by PIL's
    bicubic filter per channel (clean-fid), and the logits are the bias-free ones of its IS."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from gm.errors import DataError
    from gm.io import sha256_file
    from gm.metrics.inception import CLEAN_RESIZE, FidInceptionFeatures, load_inception

    path, _ = fid_inception_weights
    net, desc = load_inception(path)
    assert desc == {"kind": "fid-inception-2015-12-05", "path": str(path),
                    "sha256": sha256_file(path), "resize": CLEAN_RESIZE}  # fmt: skip
    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (2, 3, 299, 299), generator=g, dtype=torch.uint8)
    reference = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                            feature_extractor_weights_path=str(path))  # fmt: skip
    with torch.no_grad():
        ref_f, ref_logits = reference(u8)
        feats = net.features(u8.float() / 127.5 - 1)
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()
    assert torch.allclose(feats, ref_f, rtol=1e-4, atol=1e-4)
    assert torch.allclose(net.head(feats), ref_logits, rtol=1e-4, atol=1e-3)
    # the resize: 8-bit values kept at 299, a flat image stays flat, a ramp stays a ramp
    assert torch.equal(FidInceptionFeatures.clean_resize(u8.float() / 127.5 - 1), u8.float())
    flat = FidInceptionFeatures.clean_resize(torch.full((1, 1, 16, 16), 0.2))
    assert flat.shape == (1, 1, 299, 299) and torch.allclose(flat, torch.tensor(153.0))
    ramp = torch.linspace(-1, 1, 32).expand(1, 1, 32, 32)
    row = FidInceptionFeatures.clean_resize(ramp)[0, 0, 150]
    assert (row[1:] >= row[:-1] - 1e-3).all() and row[0] < 20 and row[-1] > 235
    with torch.no_grad():  # grey images: repeated to RGB
        assert net.features(torch.rand(1, 1, 32, 32) * 2 - 1).shape == (1, 2048)
    state = torch.load(path, weights_only=True)
    state["Mixed_7c.branch_pool.conv.weight"] = torch.zeros(3, 3)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(DataError, match="bad.pth: weights do not fit the FID Inception"):
        load_inception(bad)


@pytest.mark.parametrize("fid", [False, True], ids=["torchvision", "fid-inception"])
def test_evaluation_with_inception_features_logs_their_hash(
    digits, inception_weights, fid_inception_weights, tmp_path, fid
):
    from gm.config import from_dict
    from gm.io import sha256_file
    from gm.metrics.evaluate import evaluate_checkpoint
    from gm.registry import families
    from gm.train.checkpoint import save_checkpoint
    from gm.train.loop import Trainer
    from gm.train.protocol import DataInfo

    cfg = ClassifierConfig(width=8, features=32, steps=30, batch_size=64)
    net, report = train_classifier(digits, 16, cfg, progress=False)
    save_classifier(tmp_path / "c.pt", net, cfg, report)
    fam = families()["cvae"]
    mcfg = from_dict(fam.config, {"z_dim": 4, "width": 8, "embed_dim": 4}, "cvae")
    trainer = Trainer(fam.build(mcfg, DataInfo(16, 1, 10)))
    save_checkpoint(tmp_path / "m.pt", "cvae", mcfg, DataInfo(16, 1, 10), trainer.state_dict())
    path, _ = fid_inception_weights if fid else inception_weights
    ev = EvalConfig(num_samples=12, metrics=("fid", "kid", "inception_score"),
                    inception_weights=str(path), min_images=2,
                    bootstrap=0)  # fmt: skip  # 2048-d: each FID resample's sqrtm costs ~2.5 s
    r = evaluate_checkpoint(tmp_path / "m.pt", tmp_path / "c.pt", digits, ev)
    kind, resize = (("fid-inception-2015-12-05", "clean-fid: 8-bit, PIL bicubic per channel ->299")
                    if fid else ("inception-v3", "bilinear-antialias ->299"))  # fmt: skip
    assert r["extractor"]["kind"] == kind and r["extractor"]["resize"] == resize
    assert r["extractor"]["sha256"] == sha256_file(path)
    assert r["fid"] >= 0 and r["fid_baseline"] >= 0 and r["inception_score"] >= 1.0


def test_gm_evaluate_scores_a_checkpoint_a_run_and_a_registered_model(digits, tmp_path, capsys,
                                                                      monkeypatch):  # fmt: skip
    # A model trained with `gm train` outside DVC could not be scored but by editing the
    # pipeline: `gm evaluate MODEL` takes a checkpoint, a run id or runs:/, or models:/.
    from mlflow import MlflowClient

    from gm import tracking
    from gm.cli import main
    from gm.config import from_dict
    from gm.registry import families
    from gm.train.checkpoint import save_checkpoint
    from gm.train.loop import Trainer
    from gm.train.protocol import DataInfo

    root = tmp_path / "proj"
    (root / "models/classifiers/digits").mkdir(parents=True)
    (root / "datasets/pyramid").mkdir(parents=True)
    (root / "datasets/pyramid/digits").symlink_to(digits, target_is_directory=True)
    monkeypatch.chdir(root)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (root / "params.yaml").write_text("evaluate: {num_samples: 100, champion_metric: fid}\n")
    cfg = ClassifierConfig(width=8, features=32, steps=60, batch_size=64)
    net, report = train_classifier(digits, 16, cfg, progress=False)
    save_classifier(root / "models/classifiers/digits/classifier.pt", net, cfg, report)
    run = tracking.RunHandle.open(root, "cvae", None, {"family": "cvae", "dataset": "digits"}, {})
    fam = families()["cvae"]
    mcfg = from_dict(fam.config, {"z_dim": 4, "width": 8, "embed_dim": 4}, "cvae")
    info = DataInfo(16, 1, 10)
    ckpt = tmp_path / "checkpoint.pt"
    save_checkpoint(ckpt, "cvae", mcfg, info, Trainer(fam.build(mcfg, info)).state_dict(),
                    extra={"mlflow_run_id": run.run_id})  # fmt: skip
    client = MlflowClient(tracking.tracking_uri(root))
    client.log_artifact(run.run_id, str(ckpt), artifact_path="final")

    ds = "datasets/pyramid/digits"
    assert main(["evaluate", str(ckpt), "--dataset", ds, "--out", "r.json"]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["metric", "model", "real", "data"]
    assert any(line.split()[0] == "fid" and len(line.split()) == 3 for line in table.splitlines())
    first = json.loads((root / "r.json").read_text())
    assert first["fid"] > first["fid_baseline"] and first["num_samples"] == 100
    history = client.get_metric_history(run.run_id, "eval/fid")
    assert [round(m.value, 6) for m in history] == [round(first["fid"], 6)]  # on its own run
    # the run, by a 12-character prefix and as runs:/: its dataset and classifier by default
    for ref in (run.run_id[:12], f"runs:/{run.run_id}/generator"):
        assert main(["evaluate", ref, "--json"]) == 0
        again = json.loads(capsys.readouterr().out)
        assert again["fid"] == pytest.approx(first["fid"]) and again["dataset"] == "digits"
    # a registered version, by alias
    client.create_registered_model("gm-cvae")
    v = client.create_model_version("gm-cvae", f"runs:/{run.run_id}/generator", run.run_id)
    client.set_registered_model_alias("gm-cvae", "champion", v.version)
    assert main(["evaluate", "models:/gm-cvae@champion", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fid"] == pytest.approx(first["fid"])
    # bad references are named, exit 2
    assert main(["evaluate", "nope.pt"]) == 2
    assert "nope.pt: no such checkpoint file" in capsys.readouterr().err
    assert main(["evaluate", "models:/gm-cvae@nobody"]) == 2
    assert "models:/gm-cvae@nobody: not found" in capsys.readouterr().err
    assert main(["evaluate", str(ckpt), "--dataset", str(tmp_path)]) == 2
    assert "not a prepared dataset" in capsys.readouterr().err


def test_classifier_evaluation_and_kid_probe_stream_the_same_numbers(digits, tmp_path,
                                                                     monkeypatch):  # fmt: skip
    """With every split streamed in windows of 50 rows (bounded reads), the classifier trains
    to the same weights and evaluation and the KID probe give the same numbers as in memory."""
    import gm.data.rowstore as rowstore
    from gm.config import from_dict
    from gm.metrics.evaluate import KidProbe, evaluate_checkpoint
    from gm.registry import families
    from gm.train.checkpoint import save_checkpoint
    from gm.train.loop import Trainer
    from gm.train.protocol import DataInfo

    monkeypatch.setattr(rowstore, "MIN_WINDOW_ROWS", 1)
    monkeypatch.setattr(rowstore, "WINDOW_BYTES", 50 * 16 * 16)
    fam = families()["cvae"]
    mcfg = from_dict(fam.config, {"z_dim": 4, "width": 8, "embed_dim": 4}, "cvae")
    info = DataInfo(16, 1, 10)
    torch.manual_seed(0)
    save_checkpoint(
        tmp_path / "m.pt", "cvae", mcfg, info, Trainer(fam.build(mcfg, info)).state_dict()
    )
    out = {}
    for mode, limit in (("memory", rowstore.MEMORY_BYTES), ("stream", 0)):
        monkeypatch.setattr(rowstore, "MEMORY_BYTES", limit)
        cfg = ClassifierConfig(width=8, features=32, steps=20, batch_size=64)
        net, report = train_classifier(digits, 16, cfg, progress=False)
        save_classifier(tmp_path / f"{mode}.pt", net, cfg, report)
        r = evaluate_checkpoint(tmp_path / "m.pt", tmp_path / f"{mode}.pt", digits,
                                EvalConfig(num_samples=120))  # fmt: skip
        probe = KidProbe(tmp_path / f"{mode}.pt", digits, info, n=64)
        out[mode] = (net.state_dict(), report, r, probe.real)
    (wm, rm, em, km), (ws, rs, es, ks) = out["memory"], out["stream"]
    assert all(torch.equal(wm[k], ws[k]) for k in wm) and rm == rs
    numbers = lambda r: {k: v for k, v in r.items() if isinstance(v, float)}  # noqa: E731
    assert numbers(em) == numbers(es) and em["fid"] > 0
    assert torch.equal(km, ks) and km.shape[0] == 64  # run.kid_samples: the probe's size


def test_too_few_images_make_distribution_metrics_unavailable_not_numbers(toy_dataset, tmp_path):
    """A 30-image dataset (3 test images): FID, KID, precision/recall and IS are withheld with
    the reason and the counts, the rest is computed; a warning names the dataset."""
    from gm.config import from_dict
    from gm.metrics.evaluate import evaluate_checkpoint, render_results, unavailable_warning
    from gm.registry import families
    from gm.train.checkpoint import save_checkpoint
    from gm.train.loop import Trainer
    from gm.train.protocol import DataInfo

    cfg = ClassifierConfig(width=4, features=8, steps=5, batch_size=8)
    net, report = train_classifier(toy_dataset, 16, cfg, progress=False)
    save_classifier(tmp_path / "c.pt", net, cfg, report)
    fam = families()["cgan"]
    mcfg = from_dict(fam.config, {"z_dim": 8, "ngf": 8, "ndf": 8, "embed_dim": 4}, "cgan")
    info = DataInfo(16, 3, 3)
    save_checkpoint(
        tmp_path / "m.pt", "cgan", mcfg, info, Trainer(fam.build(mcfg, info)).state_dict()
    )
    r = evaluate_checkpoint(
        tmp_path / "m.pt", tmp_path / "c.pt", toy_dataset, EvalConfig(num_samples=20)
    )
    assert set(r["unavailable"]) == {"fid", "kid", "precision_recall", "inception_score"}
    assert not {"fid", "fid_baseline", "kid", "precision", "recall", "inception_score"} & set(r)
    assert 0 <= r["conditional_accuracy"] <= 1  # needs no distribution: still computed
    why = r["unavailable"]["fid"]
    assert (
        why.startswith("needs >= 50 images per set; 'ds' gave ")
        and f"{r['num_real']} real test" in why
    )
    r["dataset"] = "toy"
    warning = unavailable_warning(r)
    assert warning.startswith(
        "warning: toy: fid, kid, precision_recall, inception_score not computed"
    )
    assert "no champion alias moves" in warning
    table = render_results(r)
    assert any(line.split()[:2] == ["fid", "unavailable"] for line in table.splitlines())


def test_the_summary_leaves_withheld_metrics_unranked_with_the_reason():
    from pipelines.summary import rank, table

    ex = {"sha256": "a" * 64, "path": "c.pt", "resize": "none"}
    base = {"dataset": "toy", "family": "dcgan", "step": 5, "extractor": ex}
    evals = rank([
        base | {"name": "b", "fid": 30.0, "fid_baseline": 3.0},
        base | {"name": "tiny", "conditional_accuracy": 0.5,
                "unavailable": {"fid": "needs >= 50 images per set; 'toy' gave 3 real test",
                                "precision_recall": "needs >= 50 images per set"}},
        base | {"name": "a", "fid": 20.0, "fid_baseline": 3.0},
    ])  # fmt: skip
    assert [(e["name"], e.get("rank")) for e in evals] == [("a", 1), ("b", 2), ("tiny", None)]
    text = table(evals)
    row = next(line for line in text.splitlines() if "| tiny |" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "–" and cells[5] == "n/a¹" and cells[7:9] == ["n/a¹", "n/a¹"]
    assert "¹ Not computed" in text and "tiny: fid, precision_recall (needs >= 50" in text


def test_bootstrap_intervals_match_the_spread_of_fresh_draws_and_narrow_with_more_images():
    """The interval's width is calibrated: FID of 30 independent draws of both sets spreads
    about as much as the bootstrap of one draw says (half-width / 1.96 vs their standard
    deviation), and 8x the images narrow it."""
    import statistics

    from gm.metrics.quality import bootstrap_interval, fid, precision_recall, wilson

    g = torch.Generator().manual_seed(0)

    def draw(n):
        return torch.randn(n, 8, generator=g), torch.randn(n, 8, generator=g) + 0.3

    spread = statistics.stdev(fid(*draw(200)) for _ in range(30))
    real, fake = draw(200)
    ((lo, hi),) = bootstrap_interval(fid, real, fake, fid(real, fake), 100, seed=1)
    assert lo < fid(real, fake) < hi
    assert 0.5 < (hi - lo) / 3.92 / spread < 2.0
    assert bootstrap_interval(fid, real, fake, fid(real, fake), 100, seed=1) == [(lo, hi)]
    real8, fake8 = draw(1600)
    ((lo8, hi8),) = bootstrap_interval(fid, real8, fake8, fid(real8, fake8), 100, seed=1)
    assert hi8 - lo8 < 0.6 * (hi - lo)  # about 1/sqrt(8) of it
    p, r = precision_recall(real, fake)
    (p_lo, p_hi), (r_lo, r_hi) = bootstrap_interval(precision_recall, real, fake, (p, r), 30)
    assert p_lo < p < p_hi and r_lo < r < r_hi
    from gm.metrics.quality import EvalSets, get

    sets = EvalSets(real, real.clone(), real.clone(), torch.zeros(200, 2), None,
                    torch.zeros(200, 2), bootstrap=30)  # fmt: skip
    pr = get("precision_recall")(sets)  # a perfect copy: precision 1, its interval within [0, 1]
    assert pr["precision"] == 1.0 and 0 <= pr["precision_ci_low"] <= pr["precision_ci_high"] <= 1
    lo, hi = wilson(0, 20)
    assert lo == pytest.approx(0.0, abs=1e-12) and 0.1 < hi < 0.2
    lo, hi = wilson(10, 20)
    assert lo == pytest.approx(1 - hi) and hi - lo < wilson(5, 10)[1] - wilson(5, 10)[0]


def test_the_summary_ties_models_whose_fid_intervals_overlap():
    from pipelines.summary import rank, table

    ex = {"sha256": "a" * 64, "path": "c.pt", "resize": "none"}
    base = {"dataset": "d", "family": "dcgan", "step": 5, "extractor": ex, "fid_baseline": 3.0}
    evals = rank([
        base | {"name": "a", "fid": 20.0, "fid_ci_low": 18.0, "fid_ci_high": 23.0},
        base | {"name": "b", "fid": 22.0, "fid_ci_low": 19.0, "fid_ci_high": 26.0},  # overlaps a
        base | {"name": "c", "fid": 30.0, "fid_ci_low": 27.0, "fid_ci_high": 33.0},
        base | {"name": "e", "fid": 31.0, "fid_ci_low": 28.0, "fid_ci_high": 34.0},  # overlaps c
        base | {"name": "f", "fid": 50.0, "fid_ci_low": 45.0, "fid_ci_high": 55.0},
    ])  # fmt: skip
    assert [e["rank"] for e in evals] == [1, 1, 3, 3, 5]
    rows = {line.split("|")[3].strip(): line.split("|")[2].strip()
            for line in table(evals).splitlines() if line.startswith("| d |")}  # fmt: skip
    assert rows == {"a": "1=", "b": "1=", "c": "3=", "e": "3=", "f": "5"}
    assert "20 [18, 23] (real 3)" in table(evals) and "share a rank" in table(evals)


def test_the_summary_averages_an_ablation_over_seeds_and_keeps_other_jobs_out(tmp_path):
    """Jobs identical but for model.augment and run.seed form one ablation: a line per setting
    with the mean and sample standard deviation over its seeds, in the Markdown and in
    summary.json; a job that differs in anything else (steps) is not part of it."""
    import statistics

    from pipelines.summary import main

    job = lambda aug, seed, steps=100: {  # noqa: E731
        "family": "dcgan",
        "dataset": "toy",
        "model": {"ngf": 8, "augment": aug},
        "run": {"steps": steps, "batch_size": 8, "checkpoint_every": 50, "seed": seed},
    }
    train = {f"dc_{a}_s{s}": job(a, s) for a in ("none", "ada", "diffaug") for s in (0, 1, 2)}
    train["dc_ada_s0"]["model"]["ada_target"] = 0.7  # ADA's own settings may differ
    train["dc_ada_s1"]["model"]["ndf"] = 128  # DCGAN's default, written out: the same config
    train["longer"] = job("ada", 0, steps=200)
    train["alone"] = job("none", 5) | {"family": "cgan"}
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump({"datasets": {"toy": {"top_resolution": 16, "channels": 3}}, "train": train})
    )
    fids = {"none": [30.0, 34.0, 38.0], "ada": [20.0, 21.0, 25.0], "diffaug": [24.0, 24.0, 27.0]}
    ex = {"sha256": "a" * 64, "path": "c.pt", "resize": "none"}
    evals = tmp_path / "eval"
    evals.mkdir()
    for name in train:
        a, s = (name.split("_")[1], int(name[-1])) if name.startswith("dc_") else ("none", 0)
        fid = fids[a][s] if name.startswith("dc_") else {"longer": 50.0, "alone": 99.0}[name]
        (evals / f"{name}.json").write_text(json.dumps({
            "name": name, "dataset": "toy", "family": train[name]["family"], "step": 100,
            "extractor": ex, "fid": fid, "kid": fid / 1e4}))  # fmt: skip
    out = tmp_path / "reports"
    params = str(tmp_path / "params.yaml")
    assert main(["--evals", str(evals), "--out", str(out), "--params", params]) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = {k: v for k, v in summary.items() if k.startswith("ablation/")}
    assert sorted(rows) == ["ablation/dc/ada", "ablation/dc/diffaug", "ablation/dc/none"]
    for a, values in fids.items():
        r = rows[f"ablation/dc/{a}"]
        assert r["n"] == 3 and r["fid_mean"] == pytest.approx(statistics.mean(values))
        assert r["fid_std"] == pytest.approx(statistics.stdev(values))
        assert r["kid_mean"] == pytest.approx(statistics.mean(values) / 1e4)
    assert summary["longer"]["fid"] == 50.0 and summary["alone"]["fid"] == 99.0
    md = (out / "summary.md").read_text()
    lines = [x for x in md.splitlines() if x.startswith("| dc |")]
    assert [x.split("|")[4].strip() for x in lines] == ["none", "ada", "diffaug"]
    assert "34 ± 4" in lines[0] and "0, 1, 2" in lines[0] and "mean ± sample standard" in md
    main(["--evals", str(evals), "--out", str(out)])  # without params: no ablation section
    assert "Ablations" not in (out / "summary.md").read_text()


def test_fid_is_torchmetrics_fid_and_bits_per_dim_can_use_a_test_subset(digits, tmp_path):
    from torchmetrics.image.fid import FrechetInceptionDistance

    from gm.config import from_dict
    from gm.metrics.evaluate import evaluate_checkpoint
    from gm.metrics.quality import _Features, fid
    from gm.registry import families
    from gm.train.checkpoint import save_checkpoint
    from gm.train.loop import Trainer
    from gm.train.protocol import DataInfo

    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(60, 16, generator=g), torch.randn(90, 16, generator=g) * 1.3 + 0.2
    m = FrechetInceptionDistance(feature=_Features(16), sync_on_compute=False)
    m.update(real.double(), real=True)
    m.update(fake.double(), real=False)
    assert fid(real, fake) == pytest.approx(float(m.compute()), rel=1e-9)
    with pytest.raises(DataError, match="FID needs >= 2 samples"):
        fid(real[:1], fake)
    cfg = ClassifierConfig(width=8, features=32, steps=10, batch_size=64)
    net, report = train_classifier(digits, 16, cfg, progress=False)
    save_classifier(tmp_path / "c.pt", net, cfg, report)
    fam = families()["cvae"]
    mcfg = from_dict(fam.config, {"z_dim": 4, "width": 8, "embed_dim": 4}, "cvae")
    save_checkpoint(tmp_path / "m.pt", "cvae", mcfg, DataInfo(16, 1, 10),
                    Trainer(fam.build(mcfg, DataInfo(16, 1, 10))).state_dict())  # fmt: skip
    runs = {}
    for k in (0, 20):
        ev = EvalConfig(num_samples=20, metrics=("bits_per_dim",), likelihood_images=k,
                        min_images=2, bootstrap=0)  # fmt: skip
        runs[k] = evaluate_checkpoint(tmp_path / "m.pt", tmp_path / "c.pt", digits, ev)
    assert runs[20]["bits_per_dim_images"] == 20
    assert runs[0]["bits_per_dim_images"] == runs[0]["num_real"] > 20
    assert runs[20]["bits_per_dim"] != runs[0]["bits_per_dim"] and runs[20]["bits_per_dim"] > 0
