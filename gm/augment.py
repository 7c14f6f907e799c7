"""Differentiable augmentation of what a discriminator sees, for GANs on small datasets.

Two methods, both applied to every image D is shown (real and generated, in D's and G's phases
and in regularization), so D never sees an un-augmented image and G is not pushed to make
augmented-looking ones:

- **ADA** (Karras et al., "Training Generative Adversarial Networks with Limited Data",
  NeurIPS 2020): each transform is applied to each image with probability ``p``; ``p`` follows
  the overfitting heuristic r_t = E[sign(D(real))], raised when r_t is above ``target`` (paper:
  0.6) and lowered below it, by ``batch·interval / (kimg·1000)`` per adjustment (``kimg`` 500:
  p can go 0 → 1 in 500k images). Transforms (the paper's "bgc" set plus cutout): x-flip,
  90-degree rotation, integer translation (up to 1/8 of the side), isotropic scaling
  (lognormal, σ = 0.2·ln 2), brightness (σ 0.2), contrast (lognormal σ 0.5·ln 2), hue rotation
  (uniform ±π about the luma axis) and saturation (lognormal σ ln 2) for RGB, and cutout (a
  square of half the side). Geometric transforms are one affine resampling
  (``torch.nn.functional.affine_grid``/``grid_sample``, reflection padding), colour one matrix.
- **DiffAugment** (Zhao et al., "Differentiable Augmentation for Data-Efficient GAN Training",
  NeurIPS 2020): colour (brightness U(−½, ½), saturation U(0, 2), contrast U(½, 3/2)),
  translation (up to 1/8 of the side, zero padding) and cutout (half the side), always on.

``p`` and the sign statistics are buffers of :class:`Augment`, so they are in the model's state
dict: a checkpoint resumes with the same ``p``. With several DDP ranks the statistics are
summed over ranks before each adjustment, so every rank keeps the same ``p``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gm.config import check

KINDS = ("none", "ada", "diffaug")


@dataclass(frozen=True)
class AugmentFields:
    """The keys an adversarial family's config adds (``model.augment`` ...)."""

    augment: str = "none"  # what D sees: none | ada (Karras et al. 2020) | diffaug (Zhao et al.)
    ada_target: float = 0.6  # ADA: the r_t = E[sign(D(real))] that p is steered to
    ada_kimg: float = 500  # ADA: thousands of images for p to go 0 -> 1
    ada_interval: int = 4  # ADA: D steps between adjustments of p


def check_augment(cfg) -> None:
    """Validate a family config's ``augment``, ``ada_target``, ``ada_kimg``, ``ada_interval``
    (errors name the key)."""
    check(cfg.augment in KINDS, "augment", f"{cfg.augment!r} is not one of {', '.join(KINDS)}")
    check(0.0 < cfg.ada_target < 1.0, "ada_target", f"{cfg.ada_target} is not in (0, 1)")
    check(cfg.ada_kimg > 0, "ada_kimg", "must be > 0")
    check(cfg.ada_interval >= 1, "ada_interval", "must be >= 1")


def build_augment(cfg) -> Augment | None:
    """The pipeline a family config asks for; None for ``augment: none``."""
    if cfg.augment == "none":
        return None
    return Augment(cfg.augment, cfg.ada_target, cfg.ada_kimg, cfg.ada_interval)


class Augment(nn.Module):
    """``forward(x)``: (B, C, H, W) images in [−1, 1] → the same shape, augmented (ADA with the
    current ``p``, or DiffAugment), differentiable in ``x``. ``observe(d_real)``: D's logits of
    the real images of one step (ADA: adjusts ``p`` every ``interval`` calls)."""

    def __init__(self, kind: str, target: float = 0.6, kimg: float = 500, interval: int = 4):
        super().__init__()
        if kind not in ("ada", "diffaug"):
            raise ValueError(f"augment: {kind!r} is not ada or diffaug")
        self.kind, self.target, self.kimg, self.interval = kind, target, kimg, interval
        self.register_buffer("p", torch.zeros((), dtype=torch.float64))
        self.register_buffer("sign_sum", torch.zeros((), dtype=torch.float64))
        self.register_buffer("sign_count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("observed", torch.zeros((), dtype=torch.int64))
        self.register_buffer("r_t", torch.zeros((), dtype=torch.float64))  # last heuristic

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "diffaug":
            return diff_augment(x)
        p = float(self.p)
        return ada_augment(x, p) if p > 0 else x

    @torch.no_grad()
    def observe(self, d_real: torch.Tensor) -> None:
        if self.kind != "ada":
            return
        self.sign_sum += torch.sign(d_real.detach().float()).sum().double().to(self.p.device)
        self.sign_count += d_real.numel()
        self.observed += 1
        if int(self.observed) % self.interval:
            return
        stats = torch.stack([self.sign_sum, self.sign_count])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(stats)  # every rank the same p
        r_t = stats[0] / stats[1].clamp(min=1)
        adjust = torch.sign(r_t - self.target) * stats[1] / (self.kimg * 1000)
        self.p.copy_((self.p + adjust).clamp(0.0, 1.0))
        self.r_t.copy_(r_t)
        self.sign_sum.zero_()
        self.sign_count.zero_()

    def stats(self) -> dict[str, float]:
        """What a run logs: ``p`` and the last r_t (ADA)."""
        return {"p": float(self.p), "r_t": float(self.r_t)} if self.kind == "ada" else {}


def _coin(b: int, p: float, device):
    """A fresh (B,) draw per call: which images a transform is applied to, each with prob p."""
    return lambda: torch.rand(b, device=device) < p


def _where(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image (B,) mask: a where set, else b (any trailing shape)."""
    return torch.where(mask.view(-1, *([1] * (a.dim() - 1))), a, b)


def ada_augment(x: torch.Tensor, p: float) -> torch.Tensor:
    """ADA's pipeline at probability ``p`` (module docstring); (B, C, H, W) in [−1, 1]."""
    return ada_colour_and_cutout(ada_geometric(x, p), p)


def ada_geometric(x: torch.Tensor, p: float) -> torch.Tensor:
    """ADA's x-flip, rot90, integer translation and isotropic scaling, each with probability
    ``p`` per image, as one bilinear resampling with reflection padding."""
    b, c, h, w = x.shape
    dev = x.device
    dtype = torch.float32
    chosen = _coin(b, p, dev)

    eye = torch.eye(3, device=dev, dtype=dtype).expand(b, 3, 3)
    # a sampling matrix in normalized coordinates, output → input
    m = eye.clone()
    flip = torch.where(chosen(), -1.0, 1.0).to(dtype)
    m = m @ _diag(flip, torch.ones_like(flip))
    k = torch.where(chosen(), torch.randint(0, 4, (b,), device=dev), 0).to(dtype)
    cos, sin = torch.cos(k * math.pi / 2).round(), torch.sin(k * math.pi / 2).round()
    m = m @ _rotation(cos, sin)
    tx = torch.where(chosen(), torch.round((torch.rand(b, device=dev) * 2 - 1) * 0.125 * w), 0)
    ty = torch.where(chosen(), torch.round((torch.rand(b, device=dev) * 2 - 1) * 0.125 * h), 0)
    m = m @ _translation(2 * tx.to(dtype) / w, 2 * ty.to(dtype) / h)
    s = torch.where(chosen(), torch.exp2(torch.randn(b, device=dev) * 0.2), 1.0).to(dtype)
    m = m @ _diag(1 / s, 1 / s)
    if not torch.equal(m, eye):
        grid = F.affine_grid(m[:, :2, :], [b, c, h, w], align_corners=False)
        x = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="reflection",
                          align_corners=False).to(x.dtype)  # fmt: skip
    return x


def ada_colour_and_cutout(x: torch.Tensor, p: float) -> torch.Tensor:
    """ADA's brightness, contrast, hue rotation and saturation (one affine map of the channel
    values; grey images: brightness and contrast) and cutout, each with probability ``p``."""
    b, c = x.shape[:2]
    dev = x.device
    chosen = _coin(b, p, dev)

    bright = torch.where(chosen(), torch.randn(b, device=dev) * 0.2, 0.0)
    contrast = torch.where(chosen(), torch.exp2(torch.randn(b, device=dev) * 0.5), 1.0)
    if c == 3:
        a = 1 / math.sqrt(3)
        vv = torch.full((3, 3), a * a, device=dev)  # v vᵀ, v the unit luma axis
        hue = torch.where(chosen(), (torch.rand(b, device=dev) * 2 - 1) * math.pi, 0.0)
        cross = a * torch.tensor([[0.0, -1, 1], [1, 0, -1], [-1, 1, 0]], device=dev)  # [v]ₓ
        rot = (vv + torch.cos(hue)[:, None, None] * (torch.eye(3, device=dev) - vv)
               + torch.sin(hue)[:, None, None] * cross)  # fmt: skip  # Rodrigues, luma axis
        sat = torch.where(chosen(), torch.exp2(torch.randn(b, device=dev)), 1.0)
        sat_m = vv + sat[:, None, None] * (torch.eye(3, device=dev) - vv)
        color = contrast[:, None, None] * (sat_m @ rot)
        x = torch.einsum("bij,bjhw->bihw", color.to(x.dtype), x) + bright.view(b, 1, 1, 1)
    else:
        x = x * contrast.view(b, 1, 1, 1) + bright.view(b, 1, 1, 1)
    return _cutout(x, chosen())


def diff_augment(x: torch.Tensor) -> torch.Tensor:
    """DiffAugment's "color,translation,cutout" policy; (B, C, H, W) in [−1, 1]."""
    b, c, h, w = x.shape
    dev = x.device
    x = x + (torch.rand(b, 1, 1, 1, device=dev, dtype=x.dtype) - 0.5)
    if c > 1:
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (torch.rand(b, 1, 1, 1, device=dev, dtype=x.dtype) * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (torch.rand(b, 1, 1, 1, device=dev, dtype=x.dtype) + 0.5) + mean
    tx = torch.randint(-(w // 8), w // 8 + 1, (b,), device=dev).float()
    ty = torch.randint(-(h // 8), h // 8 + 1, (b,), device=dev).float()
    m = _translation(2 * tx / w, 2 * ty / h)
    grid = F.affine_grid(m[:, :2, :], [b, c, h, w], align_corners=False)
    x = F.grid_sample(x.float(), grid, mode="nearest", padding_mode="zeros",
                      align_corners=False).to(x.dtype)  # fmt: skip
    return _cutout(x, torch.ones(b, dtype=torch.bool, device=dev))


def _cutout(x: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """Zero a square of half the side at a random centre, in the images ``which`` selects."""
    b, _, h, w = x.shape
    dev = x.device
    cy = torch.randint(0, h, (b, 1, 1), device=dev)
    cx = torch.randint(0, w, (b, 1, 1), device=dev)
    ys, xs = torch.arange(h, device=dev).view(1, -1, 1), torch.arange(w, device=dev).view(1, 1, -1)
    inside = ((ys - cy).abs() < h // 4) & ((xs - cx).abs() < w // 4) & which.view(b, 1, 1)
    return x * (~inside).unsqueeze(1).to(x.dtype)


def _diag(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    m = torch.zeros(sx.shape[0], 3, 3, device=sx.device, dtype=sx.dtype)
    m[:, 0, 0], m[:, 1, 1], m[:, 2, 2] = sx, sy, 1
    return m


def _rotation(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    m = _diag(cos, cos)
    m[:, 0, 1], m[:, 1, 0] = -sin, sin
    return m


def _translation(tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    m = _diag(torch.ones_like(tx), torch.ones_like(tx))
    m[:, 0, 2], m[:, 1, 2] = tx, ty
    return m


def same_draws(fn, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``fn`` (an :class:`Augment`) applied to each tensor with the same random draws: the
    RNG of the tensors' device is reset to one state before each call, so aligned images of
    the same batch size (B, C, H, W, any C) get the same transform image by image. Afterwards
    the RNG is where one call leaves it."""
    dev = xs[0].device
    cuda = dev.type == "cuda"
    state = torch.cuda.get_rng_state(dev) if cuda else torch.get_rng_state()
    out = []
    for i, x in enumerate(xs):
        if i:
            torch.cuda.set_rng_state(state, dev) if cuda else torch.set_rng_state(state)
        out.append(fn(x))
    return tuple(out)


def _draws(seed: int, step: int, rank: int, stream: int) -> torch.Generator:
    """The generator of a dataset transform's draws at one step: a function of (seed, rank,
    step) alone, one independent ``stream`` per transform, so a resumed run sees the same
    batches."""
    return torch.Generator().manual_seed(seed * 1_000_003 + rank * 7919 + step + stream * 104_729)


def _every_image(batch, f):
    """``batch`` with ``f`` applied to its images, their pyramid levels and paired inputs."""
    from gm.train.protocol import Batch

    def g(x):
        return None if x is None else f(x)

    return Batch(g(batch.images), batch.labels, {r: g(v) for r, v in batch.levels.items()},
                 g(batch.inputs))  # fmt: skip


def mirror(batch, seed: int, step: int, rank: int = 0):
    """Dataset x-flip (``run.mirror``, as in Progressive GAN and StyleGAN): half the images of
    the batch, chosen from (seed, rank, step) alone, flipped left-right with their pyramid
    levels and paired inputs, so a resumed run sees the same batches."""
    flip = torch.rand(batch.images.shape[0], generator=_draws(seed, step, rank, 0)) < 0.5
    return _every_image(batch, lambda x: _where(flip.to(x.device), x.flip(-1), x))


def rot90(batch, seed: int, step: int, rank: int = 0):
    """Dataset 90-degree rotations (``run.rot90``): each image of the batch turned by 0, 90,
    180 or 270 degrees counter-clockwise (uniformly, ``torch.rot90`` over H and W), chosen
    from (seed, rank, step) alone and independently of :func:`mirror`'s flips, with its
    pyramid levels and paired inputs, so a resumed run sees the same batches. With
    ``run.mirror``, each of the square's 8 symmetries is equally likely: the flips and
    rotations super-resolution (Lim et al., EDSR, 2017) and learned-codec training use to
    multiply a small set of patches. Raises ValueError for images that are not square."""
    turns = torch.randint(0, 4, (batch.images.shape[0],), generator=_draws(seed, step, rank, 1))

    def f(x):
        if x.shape[-1] != x.shape[-2]:
            raise ValueError(f"run.rot90: {x.shape[-2]}x{x.shape[-1]} images are not square")
        out, at = x.clone(), turns.to(x.device)
        for k in (1, 2, 3):  # each image rotated once: only those of each turn
            out[at == k] = torch.rot90(x[at == k], k, (-2, -1))
        return out

    return _every_image(batch, f)
