"""Cost of the FID bootstrap interval: gm's ``fid`` (torchmetrics' ``_compute_fid`` on the two
sets' means and covariances) against building torchmetrics' ``FrechetInceptionDistance`` for
every resample, as gm did before, measured in one run on the same features.

    python bench/bench_fid_bootstrap.py [--resamples 200] [--real 171] [--fake 500] [--dim 128]

The defaults are the digits evaluation's sizes (171 real test images, 500 samples, the domain
classifier's 128 features). Prints seconds per bootstrap for each, their ratio, and the largest
difference between the two FID values over the resamples.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def metric_object_fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    from gm.metrics.quality import _LOCAL, _Features

    m = FrechetInceptionDistance(feature=_Features(real.shape[1]), **_LOCAL)
    m.update(real.double(), real=True)
    m.update(fake.double(), real=False)
    return float(m.compute())


def main() -> None:
    from gm.metrics.quality import fid

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--resamples", type=int, default=200)
    ap.add_argument("--real", type=int, default=171)
    ap.add_argument("--fake", type=int, default=500)
    ap.add_argument("--dim", type=int, default=128)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    real = torch.randn(args.real, args.dim, generator=g)
    fake = torch.randn(args.fake, args.dim, generator=g) * 1.2 + 0.3
    n_r, n_f = args.real, args.fake
    idx = [(torch.randint(n_r, (n_r,), generator=g), torch.randint(n_f, (n_f,), generator=g))
           for _ in range(args.resamples)]  # fmt: skip
    times, values = {}, {}
    for name, fn in (("metric object (before)", metric_object_fid), ("gm fid (now)", fid)):
        fn(real, fake)  # warm-up (imports)
        t = time.perf_counter()
        values[name] = [fn(real[i], fake[j]) for i, j in idx]
        times[name] = time.perf_counter() - t
    for name, s in times.items():
        each = s / args.resamples * 1e3
        print(f"{name:24s} {s:7.2f} s per bootstrap of {args.resamples} ({each:.1f} ms each)")
    a, b = values.values()
    print(
        f"speed-up: {times['metric object (before)'] / times['gm fid (now)']:.2f}x; "
        f"largest |difference|: {max(abs(x - y) for x, y in zip(a, b, strict=True)):.2e}"
    )


if __name__ == "__main__":
    main()
