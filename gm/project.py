"""``gm project``: find the latent of an image in a trained StyleGAN (projection into W).

After StyleGAN2's projector (Karras et al., CVPR 2020, "Analyzing and Improving the Image
Quality of StyleGAN", section 5 and appendix D): one w, shared by every layer, is optimized
from the mean w̄ of 10,000 mapped latents with Adam, while

- Gaussian noise of scale σ_w · 0.05 · max(0, 1 − t / 0.75)² is added to w (σ_w: the spread of
  the mapped latents), so that early steps explore;
- the learning rate ramps up over the first 5 % of steps and down by a cosine over the last
  25 %;
- the per-layer noise inputs are optimized too, renormalized to zero mean and unit variance
  after each step, and regularized (weight 10⁵) by the squared autocorrelation at one-pixel
  shifts, at every scale of a pyramid down to 8×8, so that they cannot carry the image.

The paper's distance is LPIPS on VGG16 features, whose weights cannot be fetched here; gm uses
the mean squared pixel error in [-1, 1], and reports it as the image's distance to the
generator. A generator reproduces its own samples closely and real images less: the distance
attributes an image to a generator (bench/bench_projection.py reports that separation as a
ROC-AUC).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gm.errors import ConfigError, DataError


@dataclass(frozen=True)
class ProjectConfig:
    steps: int = 1000  # the paper's
    lr: float = 0.1
    w_avg_samples: int = 10_000
    initial_noise_factor: float = 0.05
    noise_ramp_length: float = 0.75
    lr_rampdown_length: float = 0.25
    lr_rampup_length: float = 0.05
    regularize_noise_weight: float = 1e5
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1:
            raise ConfigError(f"--steps {self.steps}: must be >= 1")
        if self.lr <= 0:
            raise ConfigError(f"--lr {self.lr}: must be > 0")


@dataclass
class Projection:
    w: torch.Tensor  # (w_dim,)
    noises: list[torch.Tensor]  # one (1, 1, side, side) per style layer
    image: torch.Tensor  # (C, H, W) in [-1, 1]: the reconstruction
    distance: float  # mean squared pixel error against the target, in [-1, 1] units
    history: list[float]  # the distance at each step


def _noise_regularizer(noises: list[torch.Tensor]) -> torch.Tensor:
    """Σ over noise maps and their 2× average-pooled pyramid (down to 8×8) of the squared
    autocorrelation at a one-pixel shift in x and in y."""
    loss = torch.zeros(())
    for n in noises:
        while True:
            loss = loss + (n * torch.roll(n, 1, dims=3)).mean() ** 2
            loss = loss + (n * torch.roll(n, 1, dims=2)).mean() ** 2
            if n.shape[-1] <= 8:
                break
            n = F.avg_pool2d(n, 2)
    return loss


def stylegan_parts(model, nets=None):
    """(StyleGenerator, level, alpha) of a trained StyleGAN model (EMA weights when ``nets``
    holds them). DataError for any other family."""
    from gm.models.stylegan import StyleGAN

    if not isinstance(model, StyleGAN):
        raise DataError(f"projection needs a StyleGAN, got {type(model).__name__}")
    G = (nets or {}).get("G", model.G)
    return G, int(model.level), float(model.alpha)


def project(G, level: int, alpha: float, target: torch.Tensor, cfg: ProjectConfig,
            progress=None) -> Projection:  # fmt: skip
    """Project ``target`` (C, H, W) in [-1, 1], at the generator's output resolution, into
    W of ``G`` (a gm StyleGenerator at ``level`` / ``alpha``). Deterministic for a seed."""
    from gm.models.stylegan import num_layers

    G = G.eval().requires_grad_(False)
    side = 4 * 2**level
    if target.shape[-1] != side or target.shape[-2] != side:
        raise DataError(f"the image is {target.shape[-1]}x{target.shape[-2]}, the generator "
                        f"draws {side}x{side}")  # fmt: skip
    g = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        z = torch.randn(cfg.w_avg_samples, G.mapping.layers[0].weight.shape[1], generator=g)
        w = G.mapping(z)
    w_avg = w.mean(0)
    w_std = math.sqrt(float(((w - w_avg) ** 2).sum()) / cfg.w_avg_samples)
    layers = num_layers(level)
    noises = [torch.randn(1, 1, 4 * 2 ** (i // 2), 4 * 2 ** (i // 2), generator=g)
              for i in range(layers)]  # fmt: skip
    for n in noises:
        n.requires_grad_(True)
    w_opt = w_avg.clone()[None].requires_grad_(True)
    opt = torch.optim.Adam([w_opt, *noises], lr=cfg.lr, betas=(0.9, 0.999))
    target = target[None].float()
    history = []
    for step in range(cfg.steps):
        t = step / cfg.steps
        noise_scale = (
            w_std * cfg.initial_noise_factor * max(0.0, 1.0 - t / cfg.noise_ramp_length) ** 2
        )
        ramp = min(1.0, (1.0 - t) / cfg.lr_rampdown_length)
        ramp = (0.5 - 0.5 * math.cos(ramp * math.pi)) * min(1.0, t / cfg.lr_rampup_length)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * ramp
        w_noisy = w_opt + torch.randn(w_opt.shape, generator=g) * noise_scale
        image = G.synthesis(w_noisy[:, None].expand(-1, layers, -1), level, alpha,
                            noises=noises)  # fmt: skip
        dist = F.mse_loss(image, target)
        loss = dist + cfg.regularize_noise_weight * _noise_regularizer(noises)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # noise maps back to zero mean, unit variance
            for n in noises:
                n -= n.mean()
                n /= n.square().mean().sqrt()
        history.append(float(dist.detach()))
        if progress is not None:
            progress(step, history[-1])
    with torch.no_grad():
        final = [n.detach().clone() for n in noises]
        image = G.synthesis(w_opt.detach()[:, None].expand(-1, layers, -1), level, alpha,
                            noises=final).clamp(-1, 1)  # fmt: skip
        distance = float(F.mse_loss(image, target))
    return Projection(w_opt.detach()[0], final, image[0], distance, history)


def main_project(args) -> int:
    """``gm project IMAGE --model CHECKPOINT``: the reconstruction PNG (target | reconstruction)
    and the distance; ``--json`` for a machine-readable line."""
    import json
    import sys
    from pathlib import Path

    from PIL import Image
    from tqdm import tqdm

    from gm.apply import read_image
    from gm.io import atomic_path
    from gm.train.checkpoint import load_checkpoint, trainer_from_checkpoint
    from gm.train.samples import image_grid

    cfg = ProjectConfig(steps=args.steps, seed=args.seed)
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out {out}: the reconstruction is written as PNG (name it *.png)")
    payload = load_checkpoint(Path(args.model))
    if payload["family"] != "stylegan":
        raise DataError(f"{args.model}: a {payload['family']} checkpoint; projection needs a "
                        "StyleGAN one")  # fmt: skip
    trainer, info = trainer_from_checkpoint(payload)
    G, level, alpha = stylegan_parts(trainer.model, trainer.sampling_nets())
    side = 4 * 2**level
    target = read_image(Path(args.image), info.channels)  # the datasets' decoding policy
    if target.shape[-1] != side or target.shape[-2] != side:
        target = F.interpolate(target[None], size=(side, side), mode="bicubic",
                               antialias=True)[0].clamp(-1, 1)  # fmt: skip
    bar = tqdm(total=cfg.steps, desc="project", unit="step", disable=args.json)
    result = project(
        G,
        level,
        alpha,
        target,
        cfg,
        progress=lambda s, d: (bar.update(1), bar.set_postfix(mse=f"{d:.4f}")),
    )
    bar.close()
    grid = image_grid(torch.stack([target, result.image]), nrow=2)
    with atomic_path(out) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
    row = {"image": str(args.image), "model": str(args.model), "distance_mse": result.distance,
           "psnr_db": 10 * math.log10(4 / max(result.distance, 1e-12)), "steps": cfg.steps,
           "reconstruction": str(out)}  # fmt: skip
    if args.json:
        print(json.dumps(row))
    else:
        print(
            f"{out}: {args.image} projected into {args.model}: MSE {result.distance:.5f} "
            f"(PSNR {row['psnr_db']:.2f} dB) after {cfg.steps} steps",
            file=sys.stdout,
        )
    return 0
