"""SRResNet and SRGAN (Ledig et al., CVPR 2017): single-image super-resolution.

Generator (SRResNet): 9×9 conv + PReLU; ``blocks`` residual blocks (3×3 conv, BN, PReLU, 3×3
conv, BN, skip); 3×3 conv + BN with a skip over the whole trunk; one sub-pixel ×2 stage per
octave of ``scale`` (3×3 conv to 4× the channels, pixel shuffle, PReLU); 9×9 conv out.
Discriminator: eight 3×3 convs 64→512 with alternating stride 1/2, BN (not on the first),
LeakyReLU(0.2), dense 1024, LeakyReLU, dense 1.

Training: ``pretrain_steps`` of SRResNet (pixel MSE only), then the adversarial phase: content
loss (VGG19 φ5,4 features rescaled by 1/12.75, or pixel MSE: ``content_loss``, always explicit)
plus 1e-3 × the non-saturating adversarial loss; Adam 1e-4, dropped to 1e-5 after
``lr_drop_steps`` adversarial steps. The VGG19 weights come from a local torchvision state dict
(``vgg19_weights``); nothing is downloaded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from gm.augment import AugmentFields, build_augment, check_augment
from gm.config import check
from gm.errors import DataError
from gm.models.losses import logistic_d_loss, logistic_g_loss
from gm.models.paired import PairedGAN
from gm.registry import register
from gm.train.protocol import Batch, DataInfo, OptimConfig, PairSource, Phase

PAPER_OPTIM = OptimConfig(lr=1e-4, betas=(0.9, 0.999))
# convs per VGG19 block (torchvision's `features`: conv, ReLU pairs; a max-pool ends a block)
VGG19_BLOCKS = (2, 2, 4, 4, 4)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _conv(c_in: int, c_out: int, k: int, padding_mode: str, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, k, 1, k // 2, bias=bias, padding_mode=padding_mode)


def _norm(ch: int, batch_norm: bool) -> nn.Module:
    return nn.BatchNorm2d(ch) if batch_norm else nn.Identity()


class ResidualBlock(nn.Module):
    def __init__(self, ch: int, batch_norm: bool = True, padding_mode: str = "zeros"):
        super().__init__()
        self.body = nn.Sequential(
            _conv(ch, ch, 3, padding_mode, bias=not batch_norm),
            _norm(ch, batch_norm),
            nn.PReLU(ch),
            _conv(ch, ch, 3, padding_mode, bias=not batch_norm),
            _norm(ch, batch_norm),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class SubPixelUpsample(nn.Module):
    """×``factor`` by sub-pixel convolution (Shi et al., CVPR 2016): a conv to ``ch·factor²``
    channels, then output pixel (y·r + i, x·r + j) of channel c = conv channel c·r² + i·r + j.
    ICNR initialisation (Aitken et al. 2017): the r² sub-pixels of a channel start with the same
    kernel, so the untrained upsampler is a nearest-neighbour one (no checkerboard)."""

    def __init__(self, ch: int, factor: int = 2, padding_mode: str = "zeros"):
        super().__init__()
        self.conv = _conv(ch, ch * factor * factor, 3, padding_mode)
        with torch.no_grad():
            w = torch.empty(ch, ch, 3, 3)
            nn.init.kaiming_normal_(w, nonlinearity="relu")
            self.conv.weight.copy_(w.repeat_interleave(factor * factor, dim=0))
            nn.init.zeros_(self.conv.bias)
        self.shuffle = nn.PixelShuffle(factor)
        self.act = nn.PReLU(ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.shuffle(self.conv(x)))  # (b, ch, h·r, w·r)


class SRResNet(nn.Module):
    def __init__(
        self,
        channels: int,  # image channels in and out
        scale: int,  # 2, 4 or 8: one sub-pixel ×2 stage per octave
        width: int = 64,  # feature maps of the trunk
        blocks: int = 16,  # residual blocks
        bicubic_skip: bool = False,  # predict the residual over bicubic upscaling (not in the
        # paper; the output layer starts at zero, so training starts from bicubic quality)
        batch_norm: bool = True,  # the paper's BN in the trunk (EDSR drops it)
        padding_mode: str = "zeros",  # "replicate": a flat input gives a flat output
    ):
        super().__init__()
        self.scale, self.bicubic_skip = scale, bicubic_skip
        pm = padding_mode
        self.head = nn.Sequential(_conv(channels, width, 9, pm), nn.PReLU(width))
        self.body = nn.Sequential(*[ResidualBlock(width, batch_norm, pm) for _ in range(blocks)])
        self.body_out = nn.Sequential(
            _conv(width, width, 3, pm, bias=not batch_norm), _norm(width, batch_norm)
        )
        self.upsample = nn.Sequential(
            *[SubPixelUpsample(width, 2, pm) for _ in range(int(math.log2(scale)))]
        )
        self.tail = _conv(width, channels, 9, pm)
        if bicubic_skip:
            nn.init.zeros_(self.tail.weight)
            nn.init.zeros_(self.tail.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(x)  # (b, width, h, w)
        h = h + self.body_out(self.body(h))
        y = self.tail(self.upsample(h))  # (b, channels, h·scale, w·scale), not clamped
        if self.bicubic_skip:
            y = y + F.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return y


class SRDiscriminator(nn.Module):
    def __init__(
        self,
        channels: int,  # image channels
        resolution: int,  # HR side, a multiple of 16 (four stride-2 convs)
        ndf: int = 64,  # first conv; doubled every second conv up to 8·ndf
        dense: int = 1024,  # hidden dense layer
    ):
        super().__init__()
        seq: list[nn.Module] = []
        ch = channels
        for i in range(8):
            out = ndf * 2 ** (i // 2)
            seq.append(nn.Conv2d(ch, out, 3, 1 + i % 2, 1, bias=i == 0))
            if i:
                seq.append(nn.BatchNorm2d(out))
            seq.append(nn.LeakyReLU(0.2, True))
            ch = out
        self.features = nn.Sequential(*seq)  # (b, 8·ndf, res/16, res/16)
        side = resolution // 16
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(ch * side * side, dense), nn.LeakyReLU(0.2, True),
            nn.Linear(dense, 1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).flatten()  # (b,) logits


def vgg19_cut(layer: str) -> int:
    """Index into torchvision's ``vgg19().features`` just after φ_i,j: the ReLU of the j-th conv
    before the i-th max-pool (``"5_4"`` → 36, ``"2_2"`` → 9)."""
    try:
        i, j = (int(v) for v in layer.split("_"))
    except ValueError:
        raise ValueError(f"VGG layer {layer!r} is not 'i_j' (e.g. '5_4')") from None
    if not (1 <= i <= 5 and 1 <= j <= VGG19_BLOCKS[i - 1]):
        raise ValueError(f"VGG19 has no φ{i},{j} (blocks of {list(VGG19_BLOCKS)} convs)")
    before = sum(2 * n + 1 for n in VGG19_BLOCKS[: i - 1])  # conv+ReLU pairs and a pool each
    return before + 2 * j


def load_vgg19_features(path: str | Path, layer: str = "5_4") -> nn.Sequential:
    """torchvision's VGG19 ``features`` up to φ_``layer``, frozen, weights from a local state
    dict in torchvision's format (``features.N.weight`` ...; the classifier and deeper layers
    may be absent). Loaded with ``weights_only=True``."""
    from torchvision.models import vgg19

    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{path}: no such VGG19 weights file") from None
    except Exception as e:  # truncated, not a torch file, pickled code
        raise DataError(f"{path}: not a VGG19 state dict ({e})") from None
    if not isinstance(state, dict):
        raise DataError(f"{path}: not a VGG19 state dict (a {type(state).__name__})")
    features = vgg19(weights=None).features[: vgg19_cut(layer)]
    wanted = {f"features.{k}": v for k, v in features.state_dict().items()}
    for key, ref in wanted.items():
        if key not in state:
            raise DataError(f"{path}: no {key!r}: not torchvision VGG19 weights up to φ{layer}")
        if state[key].shape != ref.shape:
            raise DataError(f"{path}: {key} has shape {tuple(state[key].shape)}, VGG19 has "
                            f"{tuple(ref.shape)}")  # fmt: skip
    features.load_state_dict({k.removeprefix("features."): state[k] for k in wanted})
    return features.eval().requires_grad_(False)


class VGGContent(nn.Module):
    """MSE between VGG19 feature maps of two images in [-1, 1] (ImageNet-normalized RGB; grey
    images repeated to 3 channels), features scaled by ``scale`` (the paper: 1/12.75)."""

    def __init__(self, features: nn.Sequential, scale: float):
        super().__init__()
        self.features, self.scale = features, scale
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        return self.features(((x + 1) / 2 - self.mean) / self.std) * self.scale

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            ref = self.embed(target)
        return F.mse_loss(self.embed(x), ref)


@dataclass(frozen=True)
class SRGANConfig(AugmentFields):  # + augment, ada_* (gm.augment)
    scale: int = 4  # upscaling factor (2, 4, 8); the paired dataset needs x<scale>.parquet
    width: int = 64  # G's trunk feature maps
    blocks: int = 16  # G's residual blocks
    # G predicts the residual over bicubic upscaling (not in the paper, which learns the whole
    # image): a CPU-minutes budget then starts from, and improves on, bicubic quality
    bicubic_skip: bool = False
    batch_norm: bool = True  # BN in G's trunk, as the paper (EDSR, Lim et al. 2017, drops it)
    padding: Literal["zeros", "replicate"] = "zeros"  # G's conv padding
    ndf: int = 64  # D's first conv (64 → 512 over eight convs)
    d_dense: int = 1024  # D's hidden dense layer
    # SRResNet steps (pixel MSE only) before the adversarial phase; the paper trains SRResNet
    # 10⁶ steps and initialises SRGAN from it. pretrain_steps >= run.steps trains SRResNet only.
    pretrain_steps: int = 1_000_000
    lr_drop_steps: int = 100_000  # adversarial steps at the initial lr; then lr × 0.1
    # Content loss of the adversarial phase: the paper's VGG19 φ5,4 (needs vgg19_weights) or
    # pixel MSE. Always explicit: a missing weights file is an error, never a silent fallback.
    content_loss: Literal["vgg19", "pixel"] = "vgg19"
    vgg19_weights: str = ""  # a torchvision vgg19 state dict on this machine
    vgg_layer: str = "5_4"  # φ_i,j: after the j-th conv (and ReLU) before the i-th max-pool
    vgg_scale: float = 1 / 12.75  # the paper's rescaling of VGG feature maps
    adversarial_weight: float = 1e-3
    optim_g: OptimConfig = field(default_factory=lambda: PAPER_OPTIM)
    optim_d: OptimConfig = field(default_factory=lambda: PAPER_OPTIM)

    def __post_init__(self):
        check(self.scale in (2, 4, 8), "scale", f"{self.scale} is not one of 2, 4, 8")
        for name in ("width", "blocks", "ndf", "d_dense"):
            check(getattr(self, name) > 0, name, "must be > 0")
        check(self.pretrain_steps >= 0, "pretrain_steps", "must be >= 0")
        check(self.lr_drop_steps >= 0, "lr_drop_steps", "must be >= 0")
        check(self.adversarial_weight >= 0, "adversarial_weight", "must be >= 0")
        check_augment(self)
        try:
            vgg19_cut(self.vgg_layer)
        except ValueError as e:
            check(False, "vgg_layer", str(e))
        check(
            self.content_loss != "vgg19" or bool(self.vgg19_weights),
            "vgg19_weights",
            "content_loss 'vgg19' needs a local torchvision vgg19 state dict (set its path), "
            "or set content_loss: pixel",
        )

    def local_files(self) -> dict[str, str]:
        """Files on this machine the training reads (checked and hashed before it starts)."""
        return {"vgg19_weights": self.vgg19_weights} if self.content_loss == "vgg19" else {}


class SRGAN(PairedGAN):
    def __init__(self, cfg: SRGANConfig, info: DataInfo):
        super().__init__()
        if info.resolution % 16:
            raise ValueError(f"SRGAN needs an HR side divisible by 16, got {info.resolution}")
        self.cfg, self.info = cfg, info
        self.G = SRResNet(
            info.channels, cfg.scale, cfg.width, cfg.blocks, cfg.bicubic_skip, cfg.batch_norm,
            cfg.padding,
        )  # fmt: skip
        self.D = SRDiscriminator(info.channels, info.resolution, cfg.ndf, cfg.d_dense)
        self.augment = build_augment(cfg)  # what D sees of HR and SR images
        self.current_step = 0  # set by on_progress: which phases are due
        self.__dict__["_content"] = None  # VGG loss net: loaded on first use, never checkpointed

    def pair_source(self) -> PairSource:
        s = self.cfg.scale
        return PairSource(f"x{s}.parquet", "lr", "hr", scale=s)

    def on_progress(self, step: int, images_seen: int) -> None:
        self.current_step = step

    def pretraining(self) -> bool:
        return self.current_step < self.cfg.pretrain_steps

    def phases(self) -> list[Phase]:
        if self.pretraining():
            return [Phase("G_mse", "G")]
        return [Phase("D", "D"), Phase("G", "G")]

    def lr_factor(self, step: int, total_steps: int) -> float:
        return 0.1 if step >= self.cfg.pretrain_steps + self.cfg.lr_drop_steps else 1.0

    def content(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.cfg.content_loss == "pixel":
            return F.mse_loss(x, target)
        if self._content is None:
            feats = load_vgg19_features(self.cfg.vgg19_weights, self.cfg.vgg_layer)
            self.__dict__["_content"] = VGGContent(feats, self.cfg.vgg_scale)
        return self._content.to(x.device)(x, target)

    def loss(self, phase: str, batch: Batch, nets: Mapping[str, nn.Module]):
        lr, hr = batch.inputs, batch.images
        if phase == "G_mse":
            return F.mse_loss(nets["G"](lr), hr), {}
        if phase == "D":
            with torch.no_grad():
                fake = nets["G"](lr)
            real_logit = nets["D"](self.augmented(hr))
            fake_logit = nets["D"](self.augmented(fake))
            loss = logistic_d_loss(real_logit, fake_logit)
            return loss, self.d_metrics(real_logit, fake_logit)
        fake = nets["G"](lr)
        content = self.content(fake, hr)  # on the images themselves, never augmented
        adversarial = logistic_g_loss(nets["D"](self.augmented(fake)))
        loss = content + self.cfg.adversarial_weight * adversarial
        return loss, {"content": content.item(), "adversarial": adversarial.item()}


@register(
    "srgan",
    SRGANConfig,
    "Ledig et al., CVPR 2017 (SRResNet / SRGAN super-resolution)",
    pairs="super_resolution",
)
def build_srgan(cfg: SRGANConfig, info: DataInfo) -> SRGAN:
    return SRGAN(cfg, info)
