"""Where a LAPGAN's FID comes from: its chain scored with real images in place of the coarser
levels' samples.

    python bench/lapgan_levels.py models/lapgan/checkpoint.pt \\
        --dataset datasets/pyramid/emoji --classifier models/classifiers/emoji/classifier.pt

Each level of a LAPGAN (Denton et al., NeurIPS 2015) is trained on real images: the finer
generators see the upsampled real coarser image. Sampling feeds them the coarser levels'
samples instead. Replacing the generated part of the chain with real images level by level
shows which level costs what. For a pyramid 32 → 16 → 8 the rows are:

    real 32                      the train images themselves (what a perfect model scores)
    real 16, upsampled           real 16×16 images, bilinear 2× up, no residual
    real 16 → G32                the same with the finest level's residual
    real 8, upsampled            ...
    real 8 → G16 → G32
    G8, upsampled                the coarsest generator alone
    G8 → G16 → G32               the sampler (the evaluate stage's FID, up to its sample draws)

A level adds something when ``real r → G…`` scores below ``real r, upsampled``. The coarsest
level costs the gap between the last row and the ``real`` chain of its resolution.

Every row is FID (gm.metrics.quality.fid) against the test split's top-resolution images, in
the domain classifier's features, as the evaluate stage scores: ``--samples`` images per row
(the train split's first rows for the real ones, the same images at every level).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def real_levels(dataset, resolutions: list[int], n: int) -> dict[int, torch.Tensor]:
    """The train split's first ``n`` images at each resolution, in [-1, 1] (N, C, r, r)."""
    from gm.data.readers import to_unit_range
    from gm.metrics.evaluate import split_store

    out = {}
    for r in resolutions:
        store = split_store(dataset, r, "train")
        rows = torch.arange(min(n, len(store)))
        out[r] = torch.cat([to_unit_range(p) for p, _ in store.batches(rows, 500)]).float()
    return out


@torch.no_grad()
def finer(model, nets, start: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Run the LAPGAN's levels finer than ``start`` (N, C, r, r) up to the top resolution, as
    its sampler does: x ← clamp(u(x) + G_r'(noise, u(x))) at each finer r'."""
    sampler, x = model.generator(nets), start
    for r in reversed(model.res[:-1]):
        if r > x.shape[-1]:
            x = sampler.refine(x, torch.randn(len(x), 1, r, r, generator=generator))
    return x


def upsampled(x: torch.Tensor, resolution: int) -> torch.Tensor:
    from gm.models.lapgan import up

    while x.shape[-1] < resolution:
        x = up(x)
    return x


def level_table(checkpoint, dataset, classifier, samples: int = 500, seed: int = 0):
    """[(row name, FID)] of a LAPGAN checkpoint, the rows of the module docstring."""
    from gm.errors import DataError
    from gm.metrics.classifier import load_classifier
    from gm.metrics.evaluate import embed, embed_rows, split_store
    from gm.metrics.quality import fid
    from gm.train.checkpoint import load_checkpoint, trainer_from_checkpoint

    payload = load_checkpoint(checkpoint)
    if payload["family"] != "lapgan":
        raise DataError(f"{checkpoint}: a {payload['family']} checkpoint, not a lapgan one")
    trainer, info = trainer_from_checkpoint(payload)
    model = trainer.model.eval()  # EMA copies are kept in eval mode
    nets = {**dict(model.nets.items()), **trainer.sampling_nets()}
    clf, extractor = load_classifier(classifier)
    size = extractor["resolution"]
    top, coarsest = model.res[0], model.res[-1]
    reference = embed_rows(clf, split_store(dataset, top, "test"), None, size)[0]
    real = real_levels(dataset, model.res, samples)
    g = torch.Generator().manual_seed(seed)

    def score(images: torch.Tensor) -> float:
        return fid(reference, embed(clf, images, size)[0])

    def arrow(r: int) -> str:
        return " → ".join(f"G{q}" for q in reversed(model.res) if q > r)

    rows = [(f"real {top}", score(real[top]))]
    for r in model.res[1:]:
        rows.append((f"real {r}, upsampled", score(upsampled(real[r], top))))
        rows.append((f"real {r} → {arrow(r)}", score(finer(model, nets, real[r], g))))
    with torch.no_grad():
        z = torch.randn(samples, model.cfg.z_dim, generator=g)
        coarse = nets[f"G{coarsest}"](z)
    rows.append((f"G{coarsest}, upsampled", score(upsampled(coarse, top))))
    rows.append((f"G{coarsest} → {arrow(coarsest)}", score(finer(model, nets, coarse, g))))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("checkpoint")
    ap.add_argument("--dataset", required=True, help="the pyramid dataset it was trained on")
    ap.add_argument("--classifier", required=True, help="the dataset's domain classifier")
    ap.add_argument("--samples", type=int, default=500, help="images per row (params.yaml's "
                    "evaluate.num_samples: 500)")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rows = level_table(args.checkpoint, args.dataset, args.classifier, args.samples, args.seed)
    width = max(len(name) for name, _ in rows)
    print(f"{'chain':<{width}}  FID")
    for name, value in rows:
        print(f"{name:<{width}}  {value:.2f}")


if __name__ == "__main__":
    main()
