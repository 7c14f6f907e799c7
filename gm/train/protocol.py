"""The training protocol every model family implements (after StyleGAN2-ADA's phases).

A family is an ``nn.Module`` that owns its networks and says:
- which of them are *trainable* (each gets its own optimizer, and its own DDP wrapper);
- its *phases*: ``Phase("D", module="D")``, ``Phase("G", module="G")``, a regularization
  phase ``Phase("Dreg", module="D", every=16)`` ...; the loop runs the due phases in order;
- the *loss* of a phase for a batch, given the networks to call (the trained module of the
  phase wrapped for DDP, every other one plain and frozen);
- how to *sample*, and which modules keep an EMA copy for sampling.

Nothing in a family touches devices, DDP, AMP, optimizers or checkpoints: the loop owns them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class Phase:
    name: str  # shown in metrics: loss/<name>
    module: str  # the trainable module whose optimizer this phase steps
    every: int = 1  # run when step % every == 0 (lazy regularization)


@dataclass(frozen=True)
class DataInfo:
    """What a family needs to know of its dataset (from the manifest)."""

    resolution: int
    channels: int
    num_classes: int


@dataclass
class Batch:
    images: torch.Tensor  # (B, C, H, W) float in [-1, 1]
    labels: torch.Tensor  # (B,) int64
    # The same images at the other pyramid levels the family asked for (`pyramid_levels`),
    # read from the dataset: {resolution: (B, C, r, r)}
    levels: dict[int, torch.Tensor] = field(default_factory=dict)
    # Paired families: the source-domain images `images` are made from (LR input of a
    # super-resolution pair, domain A of a translation pair), aligned row by row with `images`;
    # for unpaired training (CycleGAN) an independent batch of domain A. (B, C, h, w)
    inputs: torch.Tensor | None = None


@dataclass(frozen=True)
class PairSource:
    """Where a paired family's data lives in its paired dataset (``datasets/pairs/<name>``).

    Evaluation always reads ``file``'s aligned ``inputs``/``targets`` columns (test split).
    Training reads the same, or with ``unpaired_file`` that file's ``image`` column split by its
    ``domain`` column (``A``: inputs, ``B``: targets), so no pair is ever seen whole."""

    file: str  # e.g. "x4.parquet", "aligned.parquet"
    inputs: str  # column of source images: "lr", "a"
    targets: str  # column of target images: "hr", "b"
    scale: int = 1  # target side / input side (super-resolution factor)
    unpaired_file: str = ""  # "unpaired.parquet": train on disjoint domain halves


@dataclass(frozen=True)
class Growth:
    """Where a growing model is in its schedule, as a function of the images seen so far
    (summed over workers). The loop reads the batch at ``resolution`` with ``batch_size`` per
    worker, sets the learning rate and resets optimizer state when a phase begins."""

    index: int  # phase of the schedule: 0, 1, 2 ...
    resolution: int  # the pyramid level this phase trains on
    alpha: float  # fade-in of the newest block, 0 → 1; 1 while stabilizing
    batch_size: int | None = None  # per worker; None: the run's batch size
    lr: float | None = None  # every module's learning rate; None: the family's optim config
    reset_optimizers: bool = False  # fresh optimizer state when this phase begins


@dataclass(frozen=True)
class OptimConfig:
    """Adam(W) settings of one trainable module."""

    lr: float = 2e-4
    betas: tuple[float, ...] = (0.5, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # max global grad norm; 0 = no clipping

    def __post_init__(self):
        from gm.config import check

        check(self.lr > 0, "lr", f"{self.lr} must be > 0")
        check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "betas",
            f"{list(self.betas)} is not two numbers in [0, 1)",
        )
        check(self.grad_clip >= 0, "grad_clip", "must be >= 0")


class GenerativeModel(nn.Module):
    """Base class of a model family; see the module docstring for the protocol."""

    conditional: bool = False
    unused_parameters: bool = False  # some parameters get no gradient in a step (growing nets)
    ema_modules: tuple[str, ...] = ()  # modules with an EMA copy used by `sample`
    sampler: str = "G"  # the trainable module that generates (its EMA copy where kept)
    # Adversarial families set ``self.augment`` (gm.augment.Augment or None) from model.augment
    # (a submodule: its p is in the state dict). Not a class attribute: nn.Module keeps
    # submodules apart, and a class attribute would hide them.

    def augmented(self, x: torch.Tensor) -> torch.Tensor:
        """What the discriminator is shown of ``x`` (real or generated): the family's
        ``model.augment`` pipeline, or ``x`` itself."""
        augment = getattr(self, "augment", None)
        return x if augment is None else augment(x)

    def augmented_pair(self, x: torch.Tensor, y: torch.Tensor):
        """``(x', y')``: one random transform of the ``model.augment`` pipeline applied to both
        (B, C, H, W) tensors, image by image (the same flip, shift, colour and cutout), for a
        discriminator that judges two aligned images together: pix2pix's (input, output),
        LAPGAN's (image, its low-pass band). ``(x, y)`` without augmentation."""
        augment = getattr(self, "augment", None)
        if augment is None:
            return x, y
        from gm.augment import same_draws

        return same_draws(augment, x, y)

    def observe_real(self, d_real: torch.Tensor, extra: dict[str, float]) -> None:
        """ADA's statistic from D's logits of the real images of a step; adds ``ada_p`` and
        ``ada_r_t`` to the phase's ``extra`` metrics."""
        augment = getattr(self, "augment", None)
        if augment is not None:
            augment.observe(d_real)
            extra |= {f"ada_{k}": v for k, v in augment.stats().items()}

    def d_metrics(self, d_real: torch.Tensor, d_fake: torch.Tensor) -> dict[str, float]:
        """A D phase's metrics from its logits of real and fake images: their means
        (``D_real``, ``D_fake``) and, through :meth:`observe_real`, ADA's p and r_t."""
        extra = {"D_real": d_real.mean().item(), "D_fake": d_fake.mean().item()}
        self.observe_real(d_real, extra)
        return extra

    def trainable(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def phases(self) -> list[Phase]:
        raise NotImplementedError

    def optim_config(self, module: str) -> OptimConfig:
        raise NotImplementedError

    def loss(
        self, phase: str, batch: Batch, nets: Mapping[str, nn.Module]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar loss of ``phase`` on ``batch`` and extra metrics to log."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(
        self,
        n: int,
        labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        nets: Mapping[str, nn.Module] | None = None,
    ) -> torch.Tensor:
        """(n, C, H, W) images in [-1, 1]; ``nets`` overrides modules (e.g. the EMA copies)."""
        raise NotImplementedError

    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one latent input of :meth:`generator` (without the batch dimension)."""
        raise NotImplementedError

    def generator(self, nets: Mapping[str, nn.Module] | None = None) -> nn.Module:
        """A module ``(z, labels) → images in [-1, 1]``: what `gm` exports as the MLflow model.
        ``labels`` is ignored by unconditional models."""
        raise NotImplementedError

    def bits_per_dim(self, batch: Batch) -> torch.Tensor | None:
        """Per-image negative log-likelihood (or its upper bound) in bits per dimension of
        8-bit data, for likelihood models; None for models without a likelihood."""
        return None

    def on_progress(self, step: int, images_seen: int) -> None:
        """Called before each step with the images seen so far by all workers (fade-in alpha,
        KL warm-up ...)."""

    def growth(self, images_seen: int) -> Growth | None:
        """The schedule of a progressively grown model at ``images_seen``; None: fixed."""
        return None

    def data_resolutions(self, resolution: int) -> tuple[int, ...]:
        """Every pyramid level a run reads (``resolution``: the configured one)."""
        levels = {g.resolution for g in self.schedule_phases()} or {resolution}
        return tuple(sorted(levels | set(self.pyramid_levels())))

    def schedule_phases(self) -> list[Growth]:
        """The phases of :meth:`growth`, in order (empty for fixed-resolution models)."""
        return []

    def pyramid_levels(self) -> tuple[int, ...]:
        """Lower pyramid levels to read alongside each batch (``Batch.levels``)."""
        return ()

    def lr_factor(self, step: int, total_steps: int) -> float:
        """Multiplier of every module's learning rate at ``step`` of ``total_steps`` (linear
        decay, step drops); 1 keeps the optimizer's configured rate."""
        return 1.0

    # Paired families (super-resolution, image-to-image translation) implement these three.
    def pair_source(self) -> PairSource | None:
        """The paired data this family trains on; None: a generative model of one image set."""
        return None

    @torch.no_grad()
    def translate(
        self, x: torch.Tensor, nets: Mapping[str, nn.Module] | None = None, reverse: bool = False
    ) -> torch.Tensor:
        """(B, C, h, w) source images in [-1, 1] → (B, C, h·s, w·s) outputs in [-1, 1];
        ``reverse``: the target → source direction of a two-way model (CycleGAN's F)."""
        raise NotImplementedError

    def translators(self, nets: Mapping[str, nn.Module] | None = None) -> dict[str, nn.Module]:
        """The modules ``x → y`` `gm` exports as MLflow models, by name (``generator``;
        CycleGAN: ``generator_ab`` and ``generator_ba``)."""
        raise NotImplementedError

    def labels_for(self, n: int, num_classes: int, device=None) -> torch.Tensor:
        """Labels 0, 1, ..., num_classes-1, 0, 1 ... for per-class sample grids."""
        return torch.arange(n, device=device) % max(num_classes, 1)


class GANPair(GenerativeModel):
    """A family of one generator ``self.G`` and one discriminator ``self.D``, optimized with
    ``self.cfg.optim_g`` and ``self.cfg.optim_d``."""

    def trainable(self) -> dict[str, nn.Module]:
        return {"G": self.G, "D": self.D}

    def optim_config(self, module: str) -> OptimConfig:
        return self.cfg.optim_g if module == "G" else self.cfg.optim_d
