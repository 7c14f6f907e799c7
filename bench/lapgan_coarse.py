"""A LAPGAN's coarsest level trained alone, and scored as ``bench/lapgan_levels.py`` scores its
``G8, upsampled`` row: the level where a LAPGAN's FID and its spread over seeds come from.

    python bench/lapgan_coarse.py --dataset datasets/pyramid/emoji \\
        --classifier models/classifiers/emoji/classifier.pt [--seed 0] [--updates 3] [--ema 0.99]
        [--spectral-norm] [--r1 1] [--conv 64]

Defaults are the pipeline's job ``lapgan`` as it was before ``coarse: conv``: the paper's MLPs
(``coarse_hidden`` 600, z 100, D with dropout 0.5), logistic losses, Adam 1e-3 with betas (0.5,
0.999), batch 32, 720 steps, one D and one G update per step (the pipeline's job now is
``--conv 64 --updates 3``). The variants, each one flag:

- ``--updates K``: K D/G updates per step (each on a fresh batch);
- ``--ema B``: sample from an EMA of G's weights;
- ``--spectral-norm``: spectral normalization of D's linear layers (Miyato et al. 2018);
- ``--r1 γ``: an R1 penalty on real images every step (Mescheder et al. 2018);
- ``--conv W``: the small DCGAN-style pair of ``model.coarse: conv`` (``gm.models.lapgan``'s
  ConvCoarseG/ConvCoarseD, ``coarse_width`` W) in place of the MLPs.

``--updates K`` draws a fresh real batch for each update; the pipeline's ``model.coarse_updates``
repeats the updates on the step's one batch (the loader gives one batch per step).

Prints one line: the settings, the training seconds and FID (500 samples, upsampled 2× per
level to the top resolution, against the test split in the domain classifier's features), beside
the same for the real coarsest images.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> dict:
    from lapgan_levels import real_levels, upsampled

    from gm.metrics.classifier import load_classifier
    from gm.metrics.evaluate import embed, embed_rows, split_store
    from gm.metrics.quality import fid
    from gm.models.lapgan import CoarseD, CoarseG, ConvCoarseD, ConvCoarseG
    from gm.models.losses import logistic_d_loss, logistic_g_loss
    from gm.train.loop import EMA

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--classifier", required=True)
    ap.add_argument("--resolution", type=int, default=8, help="the coarsest level")
    ap.add_argument("--top", type=int, default=32, help="the LAPGAN's resolution, scored at")
    ap.add_argument("--steps", type=int, default=720)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--updates", type=int, default=1)
    ap.add_argument("--ema", type=float, default=0.0)
    ap.add_argument("--spectral-norm", action="store_true")
    ap.add_argument("--r1", type=float, default=0.0)
    ap.add_argument("--conv", type=int, default=0)
    a = ap.parse_args(argv)

    torch.manual_seed(a.seed)
    clf, extractor = load_classifier(a.classifier)
    size = extractor["resolution"]
    reference = embed_rows(clf, split_store(a.dataset, a.top, "test"), None, size)[0]
    real = real_levels(a.dataset, [a.resolution], sys.maxsize)[a.resolution]
    channels, z_dim = real.shape[1], 100
    if a.conv:
        G = ConvCoarseG(z_dim, a.resolution, channels, a.conv)
        D = ConvCoarseD(a.resolution, channels, a.conv)
    else:
        G, D = CoarseG(z_dim, a.resolution, channels, 600), CoarseD(a.resolution, channels, 600)
    if a.spectral_norm:  # registered on each layer in place
        for m in [m for m in D.modules() if isinstance(m, nn.Linear)]:
            nn.utils.parametrizations.spectral_norm(m)
    ema = EMA(G, a.ema) if a.ema else None
    opt_g = torch.optim.Adam(G.parameters(), a.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), a.lr, betas=(0.5, 0.999))

    tick = time.perf_counter()
    for _ in range(a.steps * a.updates):
        x = real[torch.randint(len(real), (a.batch_size,))].requires_grad_(a.r1 > 0)
        with torch.no_grad():
            fake = G(torch.randn(a.batch_size, z_dim))
        d_real = D(x)  # both pairs' D return logits (B,)
        loss = logistic_d_loss(d_real, D(fake))
        if a.r1:
            (grad,) = torch.autograd.grad(d_real.sum(), x, create_graph=True)
            loss = loss + a.r1 / 2 * grad.pow(2).sum(dim=(1, 2, 3)).mean()
        opt_d.zero_grad()
        loss.backward()
        opt_d.step()
        loss = logistic_g_loss(D(G(torch.randn(a.batch_size, z_dim))))
        opt_g.zero_grad()
        loss.backward()
        opt_g.step()
        if ema is not None:
            ema.update(G)
    seconds = time.perf_counter() - tick
    sampler = (ema.module if ema is not None else G).eval()
    with torch.no_grad():
        z = torch.randn(a.samples, z_dim, generator=torch.Generator().manual_seed(0))
        samples = sampler(z)
    result = {
        "settings": {k: v for k, v in vars(a).items() if k not in ("dataset", "classifier")},
        "train_s": round(seconds, 1),
        "fid": fid(reference, embed(clf, upsampled(samples, a.top), size)[0]),
        "fid_real": fid(reference, embed(clf, upsampled(real[: a.samples], a.top), size)[0]),
    }
    print(f"{result['settings']}  train {seconds:.0f} s  FID {result['fid']:.2f}  "
          f"(real {a.resolution}x{a.resolution}, upsampled: {result['fid_real']:.2f})")  # fmt: skip
    return result


if __name__ == "__main__":
    main()
