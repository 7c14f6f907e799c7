"""The rate–distortion stage (gm.metrics.rd, pipelines/rd.py) and the codec sweep behind it:
real files measured against the likelihood estimate, baselines on the same mosaics, the
params checks that tie rd → tune sweep → train_codec job, warm starts and kept checkpoints."""

from __future__ import annotations

import copy
import csv
import json
import math
import sys

import numpy as np
import pytest
import torch
import yaml

from gm import params
from gm.config import yaml_load
from gm.errors import ConfigError
from gm.metrics import rd
from gm.models.codec import Codec, CodecConfig
from gm.train.checkpoint import save_checkpoint
from gm.train.loop import Trainer
from gm.train.protocol import Batch, DataInfo, OptimConfig

from .conftest import REPO


def smooth_images(n: int, side: int, seed: int) -> list[np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, side // 16, side // 16, generator=g)
    x = torch.nn.functional.interpolate(low, size=side, mode="bilinear")
    return [(im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for im in x]


def fitted_codec(lmbda: float, steps: int = 25, seed: int = 0) -> Codec:
    torch.manual_seed(seed)
    cfg = CodecConfig(n=16, m=16, lmbda=lmbda, optim=OptimConfig(lr=2e-3, betas=(0.9, 0.999)))
    model = Codec(cfg, DataInfo(64, 3, 1))
    trainer = Trainer(model)
    for i in range(steps):
        x = torch.from_numpy(np.stack(smooth_images(8, 64, 100 + i))).permute(0, 3, 1, 2)
        trainer.train_step(Batch(x.float() / 127.5 - 1, torch.zeros(8, dtype=torch.long)))
    return model


def sweep_dir(tmp_path, lmbdas=(0.002, 0.01, 0.05, 0.2)):
    """A folder shaped like a keep_checkpoints search: checkpoints/<trial>/{checkpoint.pt,
    trial.json}."""
    out = tmp_path / "sweep"
    for i, lm in enumerate(lmbdas):
        model = fitted_codec(lm)
        d = out / "checkpoints" / f"t{i}"
        d.mkdir(parents=True)
        save_checkpoint(d / "checkpoint.pt", "codec", model.cfg, model.info,
                        Trainer(model).state_dict())  # fmt: skip
        (d / "trial.json").write_text(json.dumps(
            {"trial_id": f"t{i}", "steps": 25, "status": "full", "mlflow_run_id": "",
             "values": {"model.lmbda": lm}}))  # fmt: skip
    return out


def test_a_codec_point_measures_real_files_against_the_estimate():
    model = fitted_codec(0.01)
    model.eval()
    images = smooth_images(2, 256, 7)
    p = rd.codec_point(model, images)
    assert p["decode_exact"]  # decoded file == the model's quantized reconstruction
    pixels = 2 * 256 * 256
    # the whole file = payload + header, the header reported apart (per file)
    assert p["bpp"] == pytest.approx(p["bpp_payload"] + 8 * p["header_bytes"] * 2 / pixels)
    assert 20 < p["header_bytes"] < 200
    # the entropy coder's payload is within 5 % (+ 64 bytes per stream) of the estimate
    assert (
        abs(p["bpp_payload"] - p["bpp_estimate"]) <= 0.05 * p["bpp_estimate"] + 8 * 64 * 4 / pixels
    )
    assert p["ratio"] == pytest.approx(24 / p["bpp"])
    assert 0 < p["ms_ssim"] <= 1
    # quality is that of the decoded 8-bit images, i.e. of the quantized reconstruction
    recs = [model.reconstruct(torch.from_numpy(im).permute(2, 0, 1).float() / 255) for im in images]
    recs8 = [(r.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for r in recs]
    assert p["psnr"] == pytest.approx(np.mean([rd.psnr(a, b) for a, b in zip(images, recs8)]))


def test_jpeg2000_by_ratio_spends_equal_bits_and_by_psnr_reaches_equal_quality():
    # two images of unlike content: a smooth one and one with fine texture
    smooth = smooth_images(1, 128, 3)[0]
    busy = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    busy = ((busy.astype(int) + smooth) // 2).astype(np.uint8)
    for target in (26, 34):
        files = [rd.encode(im, "jpeg2000_psnr", target) for im in (smooth, busy)]
        quality = [rd.psnr(im, rd.decode(f)) for im, f in zip((smooth, busy), files)]
        # each image near the target PSNR, the busy one at several times the smooth one's bits
        assert all(abs(q - target) < 1.5 for q in quality), quality
        assert len(files[1]) > 3 * len(files[0])
    files = [rd.encode(im, "jpeg2000", 16) for im in (smooth, busy)]  # ratio 16: 1.5 bpp
    quality = [rd.psnr(im, rd.decode(f)) for im, f in zip((smooth, busy), files)]
    assert abs(len(files[0]) - len(files[1])) < 0.1 * len(files[1])  # the same bits
    assert quality[0] > quality[1] + 5  # so the smooth image comes out far better
    with pytest.raises(ConfigError, match="jpeg2001"):
        rd.RDConfig(dataset="d", sweep="s", baselines=("jpeg", "jpeg2001"))
    labels = [c.label for c in rd.CODECS.values()]
    assert len(set(labels)) == len(labels) and all(labels)  # the plots tell the curves apart


def test_ms_ssim_is_one_for_equal_images_lower_for_noisy_and_nan_when_too_small():
    a = smooth_images(2, 256, 1)
    noisy = [np.clip(x.astype(int) + np.random.default_rng(0).integers(-40, 40, x.shape), 0, 255)
             .astype(np.uint8) for x in a]  # fmt: skip
    assert rd.ms_ssim(a, a) == pytest.approx(1.0, abs=1e-5)
    assert rd.ms_ssim(a, noisy) < 0.95
    assert math.isnan(rd.ms_ssim([x[:64, :64] for x in a], [x[:64, :64] for x in a]))
    # images of several sizes (the rd stage's blocks): the mean over those large enough
    mixed_a, mixed_b = [a[0], a[1][:192], a[1][:128]], [noisy[0], noisy[1][:192], noisy[1][:128]]
    each = [rd.ms_ssim([x], [y]) for x, y in zip(mixed_a[:2], mixed_b[:2], strict=True)]
    assert rd.ms_ssim(mixed_a, mixed_b) == pytest.approx(np.mean(each), abs=1e-6)
    assert each[0] != pytest.approx(each[1], abs=1e-4)  # a mean of two different values


def test_evaluate_rd_writes_a_curve_the_baselines_and_bd_rates(tmp_path, toy_dataset,
                                                                monkeypatch):  # fmt: skip
    # toy_dataset: 16x16 RGB tiles; 16 of them fill one 64x64 mosaic
    cfg = rd.RDConfig(dataset="toy", sweep="s", split="train", mosaic=64)
    sweep = sweep_dir(tmp_path)
    result, example = rd.evaluate_rd(cfg, toy_dataset, sweep, progress=False)
    json.dumps(result)  # the table alone, for the stage's JSON
    assert result["images"] >= 1 and result["mosaic"] == 64
    learned = result["learned"]
    assert [p["name"] for p in sorted(learned, key=lambda p: p["lmbda"])] == [
        "t0",
        "t1",
        "t2",
        "t3",
    ]
    assert [p["bpp"] for p in learned] == sorted(p["bpp"] for p in learned)
    assert all(p["decode_exact"] for p in learned)
    baselines = ("jpeg", "webp", "jpeg2000", "jpeg2000_psnr")
    assert tuple(result["baselines"]) == baselines  # the default set, in order
    for b in baselines:
        pts = result["baselines"][b]
        assert len(pts) == len(rd.CODECS[b].settings)
        assert pts[-1]["psnr"] > pts[0]["psnr"]  # more bits, better quality
        assert result["container_bytes"][b] > 0
    pooled = result["pooled"]
    for tables, quality in ((result, "psnr"), (pooled, "psnr_pooled")):
        assert set(tables["bd_rate"]) == {"learned", *baselines[1:]}
        assert set(tables["bd_rate_learned_vs"]) == set(baselines[1:])
        assert set(tables["bd_overlap"]) == set(baselines)
        assert all(0 <= v <= 1 for v in tables["bd_overlap"].values())
        # each figure on its own quality key: webp against JPEG, the learned curve against WebP
        jpeg, webp = result["baselines"]["jpeg"], result["baselines"]["webp"]
        assert tables["bd_rate"]["webp"] == rd.bd_rate_of(jpeg, webp, quality)
        assert tables["bd_rate_learned_vs"]["webp"] == rd.bd_rate_of(webp, learned, quality)
    for p in (*learned, *result["baselines"]["jpeg"]):  # pooled: the MSE of all pixels
        assert 0 < p["psnr_pooled"] < 100
    front = rd.rd_front([(p["bpp"], p["psnr"]) for p in learned])
    assert len(result["dominated"]) == len(learned) - len(front)
    rows = rd.rd_rows(result)
    assert len(rows) == 4 + sum(len(rd.CODECS[b].settings) for b in rd.CODECS)
    # the strip's image, kept by the pass: the first mosaic (all are the same size)
    assert np.array_equal(example, rd.load_mosaics(toy_dataset, "train", 64, 1)[0])
    strip = rd.comparison_strip(example, result, sweep, crop=64)
    assert strip.shape == (64, 64 * 6 + 4 * 5, 3)  # original, 4 learned, JPEG
    # images of several sizes in the pass (blocks at a photo's edge): the largest is kept, the
    # first of two equal ones, whatever comes before or after it
    a, b, c = smooth_images(3, 64, 11)
    images = [a, np.concatenate([b, a]), np.concatenate([c, b]), b]
    monkeypatch.setattr(rd, "iter_held_out", lambda *args: iter(images))
    again, example = rd.evaluate_rd(cfg, toy_dataset, sweep, progress=False)
    assert again["images"] == 4 and np.array_equal(example, images[1])


def test_no_kept_checkpoints_and_too_few_tiles_are_clear_errors(tmp_path, toy_dataset):
    from gm.errors import DataError

    cfg = rd.RDConfig(dataset="toy", sweep="s", split="train", mosaic=64)
    with pytest.raises(DataError, match="no kept codec checkpoints"):
        rd.evaluate_rd(cfg, toy_dataset, tmp_path, progress=False)
    with pytest.raises(DataError, match="do not fill one 256x256 mosaic"):
        rd.load_mosaics(toy_dataset, "train", 256)


def test_a_tally_pools_squared_error_beside_the_mean_of_per_image_psnrs():
    a, b = smooth_images(2, 64, 5)
    noisy = np.clip(b.astype(int) + 10 * (np.arange(b.size).reshape(b.shape) % 2), 0, 255)
    noisy = noisy.astype(np.uint8)
    tally = rd.Tally(with_ms_ssim=False)
    tally.add(a, a, 100)  # coded losslessly: 100 dB by convention
    tally.add(b, noisy, 300)
    p = tally.point()
    mse = np.mean((b.astype(float) - noisy) ** 2) / 2  # over both images' values
    assert p["bpp"] == 8 * 400 / (2 * 64 * 64)
    assert p["psnr"] == pytest.approx((100 + rd.psnr(b, noisy)) / 2)
    assert p["psnr_pooled"] == pytest.approx(10 * math.log10(255**2 / mse))
    assert p["psnr_pooled"] < p["psnr"] - 20  # the lossless image does not dominate it


def test_iter_split_reads_one_row_group_at_a_time(tmp_path, monkeypatch):
    import pyarrow.parquet as pq
    from PIL import Image

    from gm.data import parquet
    from gm.data.config import DatasetConfig
    from gm.data.prepare import prepare_dataset

    for i, img in enumerate(smooth_images(12, 32, 9)):
        d = tmp_path / "raw" / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i}.png")
    monkeypatch.setattr(parquet, "ROW_GROUP_BYTES", 3 * 32 * 32 * 3)  # 3 top-level rows a group
    prepare_dataset(tmp_path / "raw", tmp_path / "ds", DatasetConfig(top_resolution=32),
                    progress=False)  # fmt: skip
    path = parquet.level_path(tmp_path / "ds", 32)
    assert pq.ParquetFile(path).num_row_groups == 4
    for split in ("train", "val", "test"):
        parts = list(parquet.iter_split(path, split, ["id", "image"]))
        assert all(0 < t.num_rows <= 3 and t.column_names == ["id", "image"] for t in parts)
        whole = parquet.read_table(path, split, ["id"]).column("id").to_pylist()
        assert [i for t in parts for i in t.column("id").to_pylist()] == whole


def test_blocks_layout_puts_held_out_tiles_back_where_they_were_cut(
    tmp_path, toy_dataset, monkeypatch
):
    import pyarrow.parquet as pq
    from PIL import Image

    from gm.data import parquet
    from gm.data.config import DatasetConfig, SplitConfig
    from gm.data.prepare import prepare_dataset
    from gm.errors import DataError

    # one smooth 16-px-tile photo of 5x7 tiles (+ a margin cut off), blocks of 2x2 tiles,
    # stored 3 tiles a row group, so that blocks span row groups as large photos' do
    photo = smooth_images(1, 128, 3)[0][: 5 * 16 + 3, : 7 * 16 + 5]
    (tmp_path / "photo").mkdir()
    Image.fromarray(photo).save(tmp_path / "photo" / "p.png")
    cfg = DatasetConfig(top_resolution=16, fit="tile", split_by="block", split_block=2,
                        split=SplitConfig(train=0.5, val=0.25, test=0.25))  # fmt: skip
    ds = tmp_path / "blocks"
    monkeypatch.setattr(parquet, "ROW_GROUP_BYTES", 3 * 16 * 16 * 3)
    prepare_dataset(tmp_path / "photo", ds, cfg, progress=False)
    assert pq.ParquetFile(parquet.level_path(ds, 16)).num_row_groups == 12
    grid = photo[1 : 1 + 5 * 16, 2 : 2 + 7 * 16]  # the centred 5x7-tile grid
    found = 0
    for split in ("train", "val", "test"):
        blocks = rd.load_blocks(ds, split)
        areas = [b.shape[0] * b.shape[1] for b in blocks]
        assert areas == sorted(areas, reverse=True)  # the largest first
        for b in blocks:
            h, w = b.shape[:2]
            assert h in (16, 32) and w in (16, 32)
            # each block is one contiguous region of the photo, on the 2x2-tile block grid
            hits = [(y, x) for y in range(0, 80, 32) for x in range(0, 112, 32)
                    if np.array_equal(grid[y : y + h, x : x + w], b)]  # fmt: skip
            assert len(hits) == 1
            found += h * w // 256
    assert found == 5 * 7  # every tile in exactly one block
    assert len(rd.load_blocks(ds, "train", 2)) == 2
    # through the stage: blocks of different sizes, counted and labelled as such
    rcfg = rd.RDConfig(dataset="p", sweep="s", split="train", layout="blocks")
    sweep = rd.load_sweep(sweep_dir(tmp_path, (0.01, 0.1)))
    result, example = rd.evaluate_rd(rcfg, ds, sweep, progress=False)
    blocks = rd.load_blocks(ds, "train")
    n = len(blocks)
    assert result["images"] == n and result["layout"] == "blocks" and result["block"] == 32
    # one pass over the streamed blocks scores as each codec's own pass over all of them
    for b in ("jpeg", "webp"):
        alone = rd.baseline_points(blocks, b)
        assert [(p["bpp"], p["setting"]) for p in alone] == [
            (p["bpp"], p["setting"]) for p in result["baselines"][b]
        ]
        assert [p["psnr"] for p in alone] == pytest.approx(
            [p["psnr"] for p in result["baselines"][b]]
        )
    for trial, model in sweep:
        (p,) = [p for p in result["learned"] if p["name"] == trial["trial_id"]]
        alone = rd.codec_point(model, blocks)
        assert p["bpp"] == alone["bpp"] and p["psnr"] == pytest.approx(alone["psnr"])
    assert rd.held_out_label(result) == f"{n} held-out blocks in place (up to 32²)"
    # the strip's image: the largest block, the one a reader asked for one block gets
    assert example.shape[:2] == (32, 32)
    # blocks of unequal quality: the pooled PSNR ranks the codecs on other figures
    jpeg, webp = result["baselines"]["jpeg"], result["baselines"]["webp"]
    assert result["pooled"]["bd_rate"]["webp"] == rd.bd_rate_of(jpeg, webp, "psnr_pooled")
    assert result["pooled"]["bd_rate"]["webp"] != result["bd_rate"]["webp"]
    assert np.array_equal(example, rd.load_blocks(ds, "train", 1)[0])
    with pytest.raises(DataError, match="split_by: block .*split_by: image"):
        rd.load_blocks(toy_dataset, "train")


def test_a_tile_goes_to_its_block_and_a_whole_image_id_is_refused_naming_it():
    from gm.data.images import tile_suffix
    from gm.errors import DataError

    key_of = rd._block_keys("datasets/pyramid/p", 2)
    assert key_of("p.png" + tile_suffix(3, 4), "p.png") == (("p.png", 1, 2), (1, 0))
    assert key_of("p.png" + tile_suffix(0, 5), "p.png") == (("p.png", 0, 2), (0, 1))
    with pytest.raises(DataError, match=r"datasets/pyramid/p: 'p\.png' is not a tile id"):
        key_of("p.png", "p.png")


def default_params() -> dict:
    return yaml_load((REPO / "params.yaml").read_text())


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda p: p["rd"]["photos"].update(sweep="dcgan"),
            "sweep: tune.dcgan searches train.dcgan, not a job of train_codec",
        ),
        (lambda p: p["rd"]["photos"].update(sweep="nosuch"), "sweep: 'nosuch' is not a key"),
        (lambda p: p["tune"]["codec_rd"].update(keep_checkpoints=False), "does not keep its"),
        (lambda p: p["rd"]["photos"].update(dataset="digits"), "dataset: digits is not RGB"),
        (lambda p: p["rd"]["photos"].update(mosaic=100), "mosaic: 100 is not a power of two"),
        (lambda p: p["datasets"]["photos"].update(split_by="image"),
         "rd.photos.layout: blocks needs datasets.photos.split_by: block"),
        (lambda p: p["rd"]["photos"].update(anchor="png"), "anchor: 'png' is not in baselines"),
        (lambda p: p["rd"]["photos"].update(baselines=["jpeg", "avif"]), "baselines: 'avif'"),
        (lambda p: p["train"].update(c=p["train_codec"]["codec"]), "train.c.family: learned"),
        (lambda p: p["train_codec"].update(g=p["train"]["dcgan"]), "train_codec.g.family: "),
        (lambda p: p["train_codec"].update(dcgan=p["train_codec"]["codec"]), "is in train too"),
    ],
)  # fmt: skip
def test_rd_and_codec_params_are_checked_naming_the_key(edit, match):
    p = default_params()
    edit(p)
    with pytest.raises(ConfigError, match=match):
        params.parse(p)


@pytest.mark.parametrize("name", ["long", "short"])
def test_the_codec_presets_sweep_the_context_model_of_the_same_codec_job(name, tmp_path, capsys):
    """presets/long and presets/short are each one DVC experiment of the root pipeline: their
    overrides, applied by DVC's own code to params.yaml, add the stages tune@codec_rd_<name>
    and rd@photos_<name> and change nothing else (the codec job is params.yaml's own; the
    search sets the context model, flips and rotations; the held-out blocks are scored)."""
    from dvc.utils.hydra import apply_overrides

    from gm.preset import main, merge, overrides

    base = yaml_load((REPO / "params.yaml").read_text())
    preset = yaml_load((REPO / f"presets/{name}/params.yaml").read_text())
    assert set(preset) == {"tune", "rd"}  # adds entries only; main declares no preset stage
    target = tmp_path / "params.yaml"
    target.write_text((REPO / "params.yaml").read_text())
    apply_overrides(target, overrides(base, preset))
    applied = yaml_load(target.read_text())
    assert applied == merge(base, preset)
    assert {k: v for k, v in applied.items() if k not in ("tune", "rd")} == {
        k: v for k, v in base.items() if k not in ("tune", "rd")
    }
    default, with_preset = params.parse(base), params.parse(applied)
    assert with_preset.rd[f"photos_{name}"].layout == "blocks"
    sweep = with_preset.tune[with_preset.rd[f"photos_{name}"].sweep]
    assert sweep.keep_checkpoints and sweep.job == default.tune["codec_rd"].job
    assert sweep.space["model.lmbda"] == default.tune["codec_rd"].space["model.lmbda"]
    assert sweep.space["model.context"] == {"grid": ["autoregressive"]}
    assert sweep.space["run.mirror"] == sweep.space["run.rot90"] == {"grid": [True]}
    assert sweep.steps > 10 * default.tune["codec_rd"].steps
    assert with_preset.tune["codec_rd"] == default.tune["codec_rd"]  # default sweep untouched
    # `make repro-<name>` prints and runs one `dvc exp run --name <name>`
    assert main([str(REPO / f"presets/{name}/params.yaml"), "--params",
                 str(REPO / "params.yaml"), "--dry"]) == 0  # fmt: skip
    assert capsys.readouterr().out.startswith(f"dvc exp run --name {name} -S ")
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"tune: {{codec_rd_{name}: {{job: nope}}}}\n")
    assert main([str(bad), "--params", str(REPO / "params.yaml"), "--dry"]) == 2
    assert f"tune.codec_rd_{name}" in capsys.readouterr().err


def test_warm_start_loads_weights_but_not_optimizer_or_step():
    a = fitted_codec(0.01, steps=3)
    ta = Trainer(a)
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    ta.train_step(Batch(x, torch.zeros(4, dtype=torch.long)))
    payload = {"trainer": ta.state_dict()}
    torch.manual_seed(5)
    b = Codec(a.cfg, a.info)
    tb = Trainer(b)
    assert not torch.equal(next(a.parameters()), next(b.parameters()))
    tb.warm_start(payload)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    assert tb.step == 0 and all(not o.state for o in tb.optimizers.values())


def test_kept_checkpoints_are_matched_by_their_searched_values(tmp_path):
    from gm.tune import _warm_start_for, kept_checkpoints

    sweep = sweep_dir(tmp_path, lmbdas=(0.002, 0.01))
    kept = kept_checkpoints(sweep)
    assert [v for v, _ in kept] == [{"model.lmbda": 0.002}, {"model.lmbda": 0.01}]
    assert _warm_start_for({"model.lmbda": 0.01}, kept).endswith("t1/checkpoint.pt")
    with pytest.raises(ConfigError, match="no kept checkpoint has the values"):
        _warm_start_for({"model.lmbda": 0.5}, kept)


def test_the_rd_stage_writes_its_reports_and_logs_both_rates_to_mlflow(
    tmp_path, toy_dataset, monkeypatch
):
    from mlflow import MlflowClient

    from pipelines import rd as stage

    p = default_params()
    p["datasets"]["toy"] = {"top_resolution": 16}
    p["rd"] = {"toy": {"dataset": "toy", "sweep": "codec_rd", "split": "train", "mosaic": 64}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    exp = client.create_experiment("gm-rd-test", artifact_location=(tmp_path / "art").as_uri())
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "gm-rd-test")
    sweep = sweep_dir(tmp_path)
    trial_runs = {}
    for meta in sorted(sweep.glob("checkpoints/*/trial.json")):  # the sweep's child runs
        doc = json.loads(meta.read_text())
        doc["mlflow_run_id"] = client.create_run(exp).info.run_id
        meta.write_text(json.dumps(doc))
        trial_runs[doc["trial_id"]] = doc["mlflow_run_id"]
    out = tmp_path / "reports" / "rd" / "toy"
    argv = ["--params", str(tmp_path / "params.yaml"), "--name", "toy", "--dataset",
            str(toy_dataset), "--sweep", str(sweep), "--out", str(out), "--quiet"]  # fmt: skip
    assert stage.main(argv) == 0
    metrics = json.loads(out.with_suffix(".json").read_text())
    assert metrics["decode_exact"] is True
    assert {f"learned_{i}_bpp" for i in range(4)} <= set(metrics)
    assert {f"learned_{i}_psnr_pooled" for i in range(4)} <= set(metrics)
    bd = {k for k in metrics if k.startswith("bd_")}
    others = ("webp", "jpeg2000", "jpeg2000_psnr")
    for tag in ("", "_pooled"):  # the same figures on the per-image and the pooled PSNR
        assert {f"bd_rate{tag}_{b}_vs_jpeg" for b in others} <= bd
        assert {f"bd_overlap{tag}_{b}" for b in ("jpeg", *others)} <= bd
    assert {f"bd_rate_vs_{b}" for b in ("jpeg", *others)} <= bd
    assert {f"bd_rate_pooled_learned_vs_{b}" for b in ("jpeg", *others)} <= bd
    assert len(bd) == 2 * (3 + 4 + 4)
    with open(out.with_suffix(".csv")) as f:
        rows = list(csv.DictReader(f))
    assert {r["codec"] for r in rows} == {"learned", "jpeg", "webp", "jpeg2000", "jpeg2000_psnr"}
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert (out.parent / "toy_samples.png").is_file()
    for run_id in trial_runs.values():  # estimated and actual bpp side by side
        m = client.get_run(run_id).data.metrics
        assert m["file/bpp"] > m["file/bpp_payload"] > 0 and m["file/bpp_estimate"] > 0
    rd_runs = client.search_runs([exp], filter_string="tags.`gm.rd` = 'toy'")
    assert len(rd_runs) == 1
    arts = {a.path for a in client.list_artifacts(rd_runs[0].info.run_id)}
    assert {"toy.json", "toy.csv", "toy.png", "toy_samples.png"} <= arts
    assert "learned/bpp" in rd_runs[0].data.metrics


def test_bad_rd_name_exits_2_naming_it(tmp_path, capsys):
    from pipelines import rd as stage

    p = copy.deepcopy(default_params())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    rc = stage.main(["--params", str(tmp_path / "params.yaml"), "--name", "nosuch", "--dataset",
                     "x", "--sweep", "y", "--out", str(tmp_path / "o")])  # fmt: skip
    assert rc == 2
    assert "rd.nosuch: no such rate–distortion evaluation" in capsys.readouterr().err
    assert not list(tmp_path.glob("o*"))


def test_rd_baselines_scores_a_reports_learned_curve_against_baselines_coded_afresh(
    tmp_path, toy_dataset, capsys
):
    """bench/rd_baselines.py: an rd report's learned points (all a BD-rate needs) against
    baselines coded again on the same held-out images; here a "learned" curve that is JPEG's
    own at half its bits, so its BD-rate against JPEG is -50 % on both PSNRs."""
    sys.path.insert(0, str(REPO / "bench"))
    from rd_baselines import main as rd_baselines

    p = default_params()
    p["datasets"]["toy"] = {"top_resolution": 16}
    p["rd"] = {"toy": {"dataset": "toy", "sweep": "codec_rd", "split": "train", "mosaic": 64}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    cfg = params.load(tmp_path / "params.yaml").rd["toy"]
    images = list(rd.iter_held_out(cfg, toy_dataset))
    report = {"images": len(images)}
    for i, pt in enumerate(rd.baseline_points(images, "jpeg")):
        report |= {f"learned_{i}_bpp": pt["bpp"] / 2, f"learned_{i}_psnr": pt["psnr"],
                   f"learned_{i}_psnr_pooled": pt["psnr_pooled"]}  # fmt: skip
    path = tmp_path / "toy.json"
    path.write_text(json.dumps(report))
    argv = [str(path), "--dataset", str(toy_dataset), "--params", str(tmp_path / "params.yaml"),
            "--name", "toy", "--baselines", "jpeg", "jpeg2000_psnr"]  # fmt: skip
    assert rd_baselines(argv) == 0
    text = capsys.readouterr().out
    assert "learned vs jpeg, mean PSNR: BD-rate -50.0 %, overlap 100%" in text
    assert "learned vs jpeg, pooled PSNR: BD-rate -50.0 %, overlap 100%" in text
    assert "JPEG 2000 (PSNR target) (jpeg2000_psnr)" in text
    assert "learned vs jpeg2000_psnr, mean PSNR" in text
    with pytest.raises(SystemExit):  # an unknown codec: argparse names the choices
        rd_baselines([*argv[:-2], "jpeg2001"])
    assert "invalid choice: 'jpeg2001'" in capsys.readouterr().err
    # a report of other images is refused, naming the dataset
    path.write_text(json.dumps(report | {"images": len(images) + 1}))
    with pytest.raises(SystemExit, match=f"{toy_dataset}: {len(images)} held-out images"):
        rd_baselines(argv)
