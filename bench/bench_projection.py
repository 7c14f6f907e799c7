"""Attribution by projection: how well a trained StyleGAN's own samples project into it
(gm.project, StyleGAN2's projector) compared with real images of its dataset.

    python bench/bench_projection.py [--model models/stylegan/checkpoint.pt] [--n 24]
                                     [--steps 300] [--dataset datasets/pyramid/emoji]

Projects ``n`` fresh samples of the model (seeds the training never used) and ``n`` real
test images (read at the generator's resolution) and prints, for each set, the mean and
median pixel MSE after projection, then the ROC-AUC of the distance at telling the two apart
(1.0: every own sample projects closer than every real image; 0.5: no separation), the
seconds per projection, and the peak resident memory.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    import torch
    from sklearn.metrics import roc_auc_score

    from gm.data.readers import to_unit_range
    from gm.metrics.evaluate import split_store
    from gm.models.stylegan import num_layers
    from gm.project import ProjectConfig, project, stylegan_parts
    from gm.train.checkpoint import load_checkpoint, trainer_from_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO / "models/stylegan/checkpoint.pt"))
    ap.add_argument("--dataset", default=str(REPO / "datasets/pyramid/emoji"))
    ap.add_argument("--n", type=int, default=24, help="images per set")
    ap.add_argument("--steps", type=int, default=300, help="projection steps (paper: 1000)")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    trainer, info = trainer_from_checkpoint(load_checkpoint(Path(args.model)))
    G, level, alpha = stylegan_parts(trainer.model, trainer.sampling_nets())
    side = 4 * 2**level
    g = torch.Generator().manual_seed(12345)
    with torch.no_grad():  # fresh samples: new latents and noise inputs
        z = torch.randn(args.n, G.mapping.layers[0].weight.shape[1], generator=g)
        ws = G.mapping(z)[:, None].expand(-1, num_layers(level), -1)
        noises = [torch.randn(args.n, 1, 4 * 2 ** (i // 2), 4 * 2 ** (i // 2), generator=g)
                  for i in range(num_layers(level))]  # fmt: skip
        own = G.synthesis(ws, level, alpha, noises=noises).clamp(-1, 1)
    test = split_store(args.dataset, side, "test")
    pixels, _ = next(test.batches(torch.arange(min(args.n, len(test))), args.n))
    real = to_unit_range(pixels)
    cfg = ProjectConfig(steps=args.steps, lr=args.lr, w_avg_samples=10_000)
    dist = {"own samples": [], "real test images": []}
    start = time.perf_counter()
    for name, images in (("own samples", own), ("real test images", real)):
        for i, x in enumerate(images):
            dist[name].append(project(G, level, alpha, x, cfg).distance)
            print(f"\r{name}: {i + 1}/{len(images)}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
    seconds = (time.perf_counter() - start) / sum(len(v) for v in dist.values())
    print(f"{args.model}: StyleGAN at {side}x{side}, {args.steps} projection steps, lr {args.lr}")
    for name, values in dist.items():
        t = torch.tensor(values)
        print(f"  {name:17s} n={len(values):3d}  MSE mean {t.mean():.5f}  median "
              f"{t.median():.5f}  min {t.min():.5f}  max {t.max():.5f}")  # fmt: skip
    labels = [1] * len(dist["own samples"]) + [0] * len(dist["real test images"])
    scores = [-d for d in dist["own samples"] + dist["real test images"]]  # closer: own
    print(f"  ROC-AUC (own vs real, by distance): {roc_auc_score(labels, scores):.3f}")
    print(f"  {seconds:.2f} s per projection; peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
