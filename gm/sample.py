"""``gm sample``: a grid of samples from a trained generator, a checkpoint or an MLflow model
(``runs:/RUN/generator``, ``models:/gm-dcgan@champion``, ``models:/gm-dcgan/3``).

``--truncation ψ`` (in [0, 1], 1 = none) trades diversity for fidelity: a StyleGAN checkpoint
moves w toward its running mean (w̄ + ψ(w − w̄), Karras et al. 2019); every other generator,
and an exported StyleGAN (whose graph fixes ψ at its training value), samples its latent at
temperature ψ (z·ψ), the form used for flows and Glow.

``--interpolate S`` draws strips instead: each row walks from one latent to another in S
images along the great circle between them (spherical interpolation, White 2016, "Sampling
Generative Networks": Gaussian latents concentrate near a sphere, where a straight line
would pass through the unlikely interior), at one class per row.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from gm.errors import ConfigError, DataError
from gm.tracking import is_model_uri, model_info


@dataclass
class Generator:
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (z, labels) → images in [-1, 1]
    latent_shape: tuple[int, ...]
    num_classes: int
    conditional: bool
    family: str
    name: str
    truncates_w: bool = False  # ψ is applied inside fn (StyleGAN checkpoint)


def load_generator(ref: str, truncation: float = 1.0) -> Generator:
    if is_model_uri(ref):
        return _from_mlflow(ref)
    return _from_checkpoint(Path(ref), truncation)


def _from_checkpoint(path: Path, truncation: float) -> Generator:
    from gm.train.checkpoint import load_checkpoint, trainer_from_checkpoint

    payload = load_checkpoint(path)
    family = payload["family"]
    trainer, info = trainer_from_checkpoint(payload)
    model = trainer.model.eval()
    if model.pair_source() is not None:
        raise DataError(f"{path}: a paired {family} model; use `gm upscale` or `gm translate`")
    nets = trainer.sampling_nets()
    truncates_w = family == "stylegan"
    try:
        gen = model.generator(nets, psi=truncation) if truncates_w else model.generator(nets)
        latent = tuple(model.latent_shape())
    except NotImplementedError:
        raise DataError(f"{path}: a {family} model has no generator to sample from") from None
    return Generator(
        fn=gen.eval(),
        latent_shape=latent,
        num_classes=info.num_classes,
        conditional=bool(model.conditional),
        family=family,
        name=f"{path} ({family}, step {payload['trainer']['step']})",
        truncates_w=truncates_w,
    )


def _from_mlflow(uri: str) -> Generator:
    import mlflow.pytorch

    minfo = model_info(uri)
    meta = minfo.metadata or {}
    if "input_resolution" in meta:
        raise DataError(f"{uri}: a paired {meta.get('family')} model; use `gm upscale` or "
                        "`gm translate`")  # fmt: skip
    if "data_info" not in meta or minfo.signature is None:
        raise DataError(f"{uri}: not a gm generator (no data_info or signature)")
    z_spec = minfo.signature.inputs.inputs[0]
    info = meta["data_info"]
    module = mlflow.pytorch.load_model(uri)
    return Generator(
        fn=module,
        latent_shape=tuple(int(d) for d in z_spec.shape[1:]),
        num_classes=int(info["num_classes"]),
        conditional=bool(meta.get("conditional", info["num_classes"] > 1)),
        family=str(meta.get("family", "?")),
        name=f"{uri} ({meta.get('family')})",
    )


def labels_for(g: Generator, n: int, label: int | None) -> torch.Tensor:
    """The labels of ``n`` samples: ``label`` for all, else each class in turn."""
    if label is None:
        return torch.arange(n) % max(g.num_classes, 1)
    if not g.conditional:
        raise ConfigError(f"--label {label}: {g.name} is unconditional")
    if not 0 <= label < g.num_classes:
        raise ConfigError(
            f"--label {label}: out of range for {g.name}, which has {g.num_classes} classes "
            f"(0–{g.num_classes - 1})"
        )
    return torch.full((n,), label, dtype=torch.long)


def _generate(g: Generator, z: torch.Tensor, labels: torch.Tensor, seed: int) -> torch.Tensor:
    """``g`` on latents ``z`` and ``labels``, 64 at a time, clamped to [-1, 1]. A generator that
    draws noise inside (the EBM's Langevin chains) draws it from torch's global RNG: seeded
    here too, without disturbing the caller's stream."""
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(z), 64):
            out.append(g.fn(z[start : start + 64], labels[start : start + 64]))
    return torch.cat(out).clamp(-1, 1)


@torch.no_grad()
def sample(
    g: Generator, n: int, label: int | None = None, truncation: float = 1.0, seed: int = 0
) -> torch.Tensor:
    """(n, C, H, W) samples in [-1, 1], the same for the same seed."""
    if not 0.0 <= truncation <= 1.0:
        raise ConfigError(f"--truncation {truncation}: must be in [0, 1] (1 = none)")
    labels = labels_for(g, n, label)
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, *g.latent_shape, generator=gen)
    if not g.truncates_w:
        z = z * truncation
    return _generate(g, z, labels, seed)


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between latents ``a`` and ``b`` (each (*shape)) at fractions
    ``t`` (T,) → (T, *shape); the straight line where the two are (anti)parallel."""
    fa, fb = a.flatten().double(), b.flatten().double()
    cos = torch.dot(fa, fb) / (fa.norm() * fb.norm()).clamp_min(1e-12)
    omega = torch.arccos(cos.clamp(-1, 1))
    t = t.double()[:, None]
    if omega.abs() < 1e-6 or (torch.pi - omega).abs() < 1e-6:
        out = (1 - t) * fa + t * fb
    else:
        out = (torch.sin((1 - t) * omega) * fa + torch.sin(t * omega) * fb) / torch.sin(omega)
    return out.to(a.dtype).reshape(len(t), *a.shape)


@torch.no_grad()
def interpolate(g: Generator, rows: int, steps: int, label: int | None = None,
                truncation: float = 1.0, seed: int = 0) -> torch.Tensor:  # fmt: skip
    """(rows · steps, C, H, W) images in [-1, 1]: ``rows`` strips, each ``steps`` samples
    along :func:`slerp` between two latents drawn from ``seed``, one class per row (``label``
    for all, else each class in turn). Raises ConfigError for ``steps`` < 2."""
    if steps < 2:
        raise ConfigError(f"--interpolate {steps}: a strip needs >= 2 images")
    if not 0.0 <= truncation <= 1.0:
        raise ConfigError(f"--truncation {truncation}: must be in [0, 1] (1 = none)")
    gen = torch.Generator().manual_seed(seed)
    ends = torch.randn(rows, 2, *g.latent_shape, generator=gen)
    if not g.truncates_w:
        ends = ends * truncation
    t = torch.linspace(0, 1, steps)
    z = torch.cat([slerp(a, b, t) for a, b in ends])
    labels = labels_for(g, rows, label).repeat_interleave(steps)
    return _generate(g, z, labels, seed)


def main_sample(args) -> int:
    from PIL import Image

    from gm.io import atomic_path
    from gm.train.samples import image_grid

    if args.n < 1:
        raise ConfigError(f"--n {args.n}: must be >= 1")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out {out}: the grid is written as PNG (name it *.png)")
    g = load_generator(args.model, args.truncation)
    if g.family == "stylegan" and not g.truncates_w and args.truncation != 1.0:
        print(f"note: {args.model} is an exported StyleGAN: ψ applies to z; pass its "
              "checkpoint for w-space truncation", file=sys.stderr)  # fmt: skip
    steps = getattr(args, "interpolate", None)
    if steps is not None:
        images = interpolate(g, args.n, steps, args.label, args.truncation, args.seed)
        grid = image_grid(images, nrow=steps)
        what = f"{args.n} interpolation strips of {steps} images"
    else:
        images = sample(g, args.n, args.label, args.truncation, args.seed)
        grid = image_grid(images, nrow=args.nrow or math.ceil(math.sqrt(args.n)))
        what = f"{args.n} samples"
    with atomic_path(out) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
    print(f"{out}: {what} of {g.name}")
    return 0
