"""Adversarial losses shared by the GAN families.

- The non-saturating logistic loss (Goodfellow et al., NeurIPS 2014, section 3): D minimizes
  E[softplus(−D(x))] + E[softplus(D(G(z)))], G minimizes E[softplus(−D(G(z)))]; D returns
  logits. Used by DCGAN, cGAN, LAPGAN, StyleGAN, Progressive GAN (``loss: logistic``), SRGAN,
  pix2pix and the AAE's latent discriminator.
- R1 (Mescheder, Geiger & Nowozin, ICML 2018): γ/2·E‖∇ₓD(x)‖² on the real images, run as a
  lazy phase every ``every`` steps and scaled by that interval (Karras et al., CVPR 2020,
  StyleGAN2's lazy regularization).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def logistic_d_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """D's loss E[softplus(−d_real)] + E[softplus(d_fake)] from logits of any shape (a scalar)."""
    return F.softplus(-d_real).mean() + F.softplus(d_fake).mean()


def logistic_g_loss(d_fake: torch.Tensor) -> torch.Tensor:
    """G's non-saturating loss E[softplus(−d_fake)] from D's logits of G's samples (a scalar)."""
    return F.softplus(-d_fake).mean()


def r1_loss(
    judge: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor, gamma: float, every: int
) -> tuple[torch.Tensor, float]:
    """R1 as a lazy phase: ``every``·γ/2·E‖∇ₓ judge(x)‖² over the real images ``real``
    (B, C, H, W). ``judge`` maps images to D's logits (B,), through whatever D sees on the way
    (ADA's augmentation, a growing model's level and fade-in), so the gradient is taken
    through it as ADA does.

    Returns ``(loss, r1)``: the scaled loss, and r1 the unscaled E‖∇ₓD‖² (a float, for the
    metrics)."""
    x = real.detach().requires_grad_(True)
    logits = judge(x)
    (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
    r1 = grad.pow(2).flatten(1).sum(1).mean()
    # + 0·logits: every parameter DDP saw in the forward gets a (zero) gradient; the output
    # bias does not reach ∇ₓD and DDP would wait for it otherwise
    return r1 * (gamma / 2) * every + 0 * logits.mean(), r1.item()
