"""CycleGAN (Zhu, Park, Isola & Efros, ICCV 2017): translation learned from unpaired images.

Generators G: A → B and F: B → A, ResNet style (c7s1-64, d128, d256, ``blocks`` residual
blocks of 256, u128, u64, c7s1-C; instance norm, reflection padding; 6 blocks at 128², 9 at
256² and above). Two 70×70 PatchGAN discriminators with instance norm. Least-squares GAN loss,
cycle consistency λ_cyc = 10, identity loss 0.5·λ_cyc, a history of 50 generated images per
domain for the discriminators, Adam 2e-4 (β1 0.5), constant learning rate for the first half of
training and linear decay to zero over the second.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from gm.augment import AugmentFields, build_augment, check_augment
from gm.config import check
from gm.models.dcgan import dcgan_init
from gm.models.paired import Clamped, ImagePool, PairedGAN, PatchGAN
from gm.registry import register
from gm.train.protocol import Batch, DataInfo, OptimConfig, PairSource, Phase

PAPER_OPTIM = OptimConfig(lr=2e-4, betas=(0.5, 0.999))


class ResnetBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(ch, ch, 3), nn.InstanceNorm2d(ch), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(ch, ch, 3), nn.InstanceNorm2d(ch),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    def __init__(
        self,
        channels: int,  # image channels in and out
        ngf: int = 64,  # c7s1 width; the residual blocks run at 4·ngf, at 1/4 of the side
        blocks: int = 9,  # residual blocks
    ):
        super().__init__()
        seq: list[nn.Module] = [
            nn.ReflectionPad2d(3), nn.Conv2d(channels, ngf, 7), nn.InstanceNorm2d(ngf),
            nn.ReLU(True),
        ]  # fmt: skip
        ch = ngf
        for _ in range(2):  # d128, d256
            seq += [nn.Conv2d(ch, ch * 2, 3, 2, 1), nn.InstanceNorm2d(ch * 2), nn.ReLU(True)]
            ch *= 2
        seq += [ResnetBlock(ch) for _ in range(blocks)]
        for _ in range(2):  # u128, u64
            seq += [
                nn.ConvTranspose2d(ch, ch // 2, 3, 2, 1, output_padding=1),
                nn.InstanceNorm2d(ch // 2),
                nn.ReLU(True),
            ]
            ch //= 2
        seq += [nn.ReflectionPad2d(3), nn.Conv2d(ch, channels, 7), nn.Tanh()]
        self.net = nn.Sequential(*seq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class GeneratorPair(nn.Module):
    """G (``ab``) and F (``ba``) as one trainable module: one forward computes every image the
    generator losses need, so DDP sees a single call."""

    def __init__(self, channels: int, ngf: int, blocks: int):
        super().__init__()
        self.ab = ResnetGenerator(channels, ngf, blocks)
        self.ba = ResnetGenerator(channels, ngf, blocks)

    def forward(self, a: torch.Tensor, b: torch.Tensor, identity: bool = True):
        fake_b, fake_a = self.ab(a), self.ba(b)
        out = {
            "fake_b": fake_b,
            "fake_a": fake_a,
            "rec_a": self.ba(fake_b),
            "rec_b": self.ab(fake_a),
        }
        if identity:
            out |= {"idt_b": self.ab(b), "idt_a": self.ba(a)}
        return out


class DiscriminatorPair(nn.Module):
    """D_A (judges domain A images) and D_B as one trainable module (one optimizer, as the
    paper's implementation)."""

    def __init__(self, channels: int, ndf: int, layers: int):
        super().__init__()
        self.a = PatchGAN(channels, ndf, layers, norm="instance")
        self.b = PatchGAN(channels, ndf, layers, norm="instance")

    def forward(self, x_a: torch.Tensor, x_b: torch.Tensor):
        return self.a(x_a), self.b(x_b)


@dataclass(frozen=True)
class CycleGANConfig(AugmentFields):  # + augment, ada_* (gm.augment)
    ngf: int = 64
    ndf: int = 64
    blocks: int = 0  # residual blocks per generator; 0 = the paper's: 6 below 256², 9 from it
    d_layers: int = 3  # PatchGAN stride-2 layers: 3 = 70×70 patches
    lambda_cycle: float = 10.0
    lambda_identity: float = 0.5  # × lambda_cycle; 0 disables the identity loss
    pool_size: int = 50  # history of generated images per domain; 0 = the current batch only
    decay_start: float = 0.5  # share of run.steps at constant lr; then linear decay to 0
    optim_g: OptimConfig = field(default_factory=lambda: PAPER_OPTIM)
    optim_d: OptimConfig = field(default_factory=lambda: PAPER_OPTIM)

    def __post_init__(self):
        for name in ("ngf", "ndf", "d_layers"):
            check(getattr(self, name) > 0, name, "must be > 0")
        check(self.blocks >= 0, "blocks", "must be >= 0 (0: the paper's count)")
        check(self.lambda_cycle >= 0, "lambda_cycle", "must be >= 0")
        check(self.lambda_identity >= 0, "lambda_identity", "must be >= 0")
        check(self.pool_size >= 0, "pool_size", "must be >= 0")
        check(0 <= self.decay_start <= 1, "decay_start", "must be in [0, 1]")
        check_augment(self)


def lsgan(pred: torch.Tensor, real: bool) -> torch.Tensor:
    """Least-squares GAN loss: (D(x) − 1)² for real targets, D(x)² for fake ones."""
    return (pred - (1.0 if real else 0.0)).pow(2).mean()


class CycleGAN(PairedGAN):
    def __init__(self, cfg: CycleGANConfig, info: DataInfo):
        super().__init__()
        if info.resolution % 4:
            raise ValueError(f"CycleGAN needs a side divisible by 4, got {info.resolution}")
        self.cfg, self.info = cfg, info
        blocks = cfg.blocks or (9 if info.resolution >= 256 else 6)
        self.G = GeneratorPair(info.channels, cfg.ngf, blocks)
        self.D = DiscriminatorPair(info.channels, cfg.ndf, cfg.d_layers)
        dcgan_init(self)  # the paper's implementation: N(0, 0.02)
        shape = (info.channels, info.resolution, info.resolution)
        self.pool_a, self.pool_b = ImagePool(cfg.pool_size, shape), ImagePool(cfg.pool_size, shape)
        self._fakes: tuple | None = None  # this step's (inputs, fake_a, fake_b) for D
        # What D_A and D_B see; one ADA p for both. LSGAN's D aims at 1 (real) and 0 (fake),
        # so ADA's r_t is taken of sign(D(real) − ½), the sign heuristic's midpoint.
        self.augment = build_augment(cfg)

    def pair_source(self) -> PairSource:
        return PairSource("aligned.parquet", "a", "b", unpaired_file="unpaired.parquet")

    def phases(self) -> list[Phase]:
        return [Phase("G", "G"), Phase("D", "D")]

    def lr_factor(self, step: int, total_steps: int) -> float:
        if total_steps <= 0:
            return 1.0
        start = int(self.cfg.decay_start * total_steps)
        return 1.0 - max(0, step - start) / (total_steps - start + 1)

    def loss(self, phase: str, batch: Batch, nets: Mapping[str, nn.Module]):
        a, b = batch.inputs, batch.images
        cfg = self.cfg
        if phase == "G":
            out = nets["G"](a, b, identity=cfg.lambda_identity > 0)
            pred_a, pred_b = nets["D"](self.augmented(out["fake_a"]), self.augmented(out["fake_b"]))
            adversarial = lsgan(pred_b, True) + lsgan(pred_a, True)
            cycle = F.l1_loss(out["rec_a"], a) + F.l1_loss(out["rec_b"], b)
            loss = adversarial + cfg.lambda_cycle * cycle
            extra = {"adversarial": adversarial.item(), "cycle": cycle.item()}
            if cfg.lambda_identity > 0:
                identity = F.l1_loss(out["idt_b"], b) + F.l1_loss(out["idt_a"], a)
                loss = loss + cfg.lambda_cycle * cfg.lambda_identity * identity
                extra["identity"] = identity.item()
            self._fakes = (a, out["fake_a"].detach(), out["fake_b"].detach())
            return loss, extra
        if self._fakes is not None and self._fakes[0] is a:
            _, fake_a, fake_b = self._fakes
        else:  # D without this step's G phase before it
            with torch.no_grad():
                fake_a, fake_b = nets["G"].ba(b), nets["G"].ab(a)
        self._fakes = None
        fake_a, fake_b = self.pool_a.query(fake_a), self.pool_b.query(fake_b)
        n_a, n_b = len(a), len(b)
        seen_a = self.augmented(torch.cat([a, fake_a]))
        seen_b = self.augmented(torch.cat([b, fake_b]))
        pred_a, pred_b = nets["D"](seen_a, seen_b)
        loss_a = 0.5 * (lsgan(pred_a[:n_a], True) + lsgan(pred_a[n_a:], False))
        loss_b = 0.5 * (lsgan(pred_b[:n_b], True) + lsgan(pred_b[n_b:], False))
        extra = {"D_A": loss_a.item(), "D_B": loss_b.item()}
        self.observe_real(torch.cat([pred_a[:n_a].flatten(), pred_b[:n_b].flatten()]) - 0.5, extra)
        return loss_a + loss_b, extra

    def translators(self, nets=None) -> dict[str, nn.Module]:
        G = (nets or {}).get("G", self.G)
        return {"generator_ab": Clamped(G.ab), "generator_ba": Clamped(G.ba)}


@register(
    "cyclegan",
    CycleGANConfig,
    "Zhu et al., ICCV 2017 (CycleGAN: unpaired translation, cycle consistency)",
    pairs="translation",
)
def build_cyclegan(cfg: CycleGANConfig, info: DataInfo) -> CycleGAN:
    return CycleGAN(cfg, info)
