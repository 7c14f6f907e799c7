"""Learned image codecs (Ballé, Minnen, Singh, Hwang & Johnston, ICLR 2018): the
factorized-prior model and the scale-hyperprior model.

x ∈ [0, 1] → analysis g_a (four 5×5 stride-2 convolutions with GDN) → y → quantized ŷ →
synthesis g_s (transposed convolutions with inverse GDN) → x̂. The factorized model codes ŷ
with a learned per-channel density; the hyperprior model sends side information
z = h_a(|y|), coded with a factorized density, from which h_s(ẑ) predicts the scale of a
zero-mean Gaussian per element of ŷ. Training minimizes λ·255²·MSE + R (bits per pixel,
from the likelihoods of ŷ + U(−½, ½)), the paper's rate–distortion Lagrangian with
CompressAI's λ scale. Real bitstreams: :meth:`Codec.compress` / :meth:`Codec.decompress`
(:mod:`gm.codec`), after :meth:`Codec.freeze`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from gm import codec as coding
from gm.config import check
from gm.registry import register
from gm.train.protocol import Batch, DataInfo, GenerativeModel, OptimConfig, Phase


@dataclass(frozen=True)
class CodecConfig:
    hyperprior: bool = True  # False: the factorized-prior model
    n: int = 128  # channels of the transforms (paper: 128 for low rates, 192 for high)
    m: int = 192  # channels of y (paper: 192 / 320)
    lmbda: float = 0.01  # λ of λ·255²·MSE + bpp (CompressAI's scale: 0.0018 … 0.0932)
    support: int = 64  # latents are coded in [−support, support]
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-4, betas=(0.9, 0.999), grad_clip=1.0)
    )

    def __post_init__(self):
        check(self.n >= 1 and self.m >= 1, "n", "channel counts must be >= 1")
        check(self.lmbda > 0, "lmbda", "must be > 0")
        check(1 <= self.support <= 4096, "support", "must be in 1..4096")


class GDN(nn.Module):
    """Generalized divisive normalization, y_i = x_i / sqrt(β_i + Σ_j γ_ij x_j²) (inverse:
    multiply), β and γ kept non-negative by squaring reparameterized values."""

    def __init__(self, ch: int, inverse: bool = False):
        super().__init__()
        self.inverse = inverse
        self.beta = nn.Parameter(torch.ones(ch).sqrt())
        self.gamma = nn.Parameter((0.1 * torch.eye(ch)).sqrt())

    def forward(self, x):
        beta = self.beta.square() + 1e-6
        gamma = self.gamma.square()[:, :, None, None]
        norm = torch.sqrt(F.conv2d(x * x, gamma, beta))
        return x * norm if self.inverse else x / norm


def _conv(cin, cout, k=5, s=2):
    return nn.Conv2d(cin, cout, k, stride=s, padding=k // 2)


def _deconv(cin, cout, k=5, s=2):
    return nn.ConvTranspose2d(cin, cout, k, stride=s, padding=k // 2, output_padding=s - 1)


class CodecNet(nn.Module):
    def __init__(self, cfg: CodecConfig, channels: int):
        super().__init__()
        n, m = cfg.n, cfg.m
        self.cfg = cfg
        self.g_a = nn.Sequential(_conv(channels, n), GDN(n), _conv(n, n), GDN(n), _conv(n, n),
                                 GDN(n), _conv(n, m))  # fmt: skip
        self.g_s = nn.Sequential(_deconv(m, n), GDN(n, True), _deconv(n, n), GDN(n, True),
                                 _deconv(n, n), GDN(n, True), _deconv(n, channels))  # fmt: skip
        if cfg.hyperprior:
            self.h_a = nn.Sequential(_conv(m, n, 3, 1), nn.ReLU(), _conv(n, n), nn.ReLU(),
                                     _conv(n, n))  # fmt: skip
            self.h_s = nn.Sequential(_deconv(n, n), nn.ReLU(), _deconv(n, n), nn.ReLU(),
                                     _conv(n, m, 3, 1), nn.ReLU())  # fmt: skip
            self.density = coding.FactorizedDensity(n, support=cfg.support)  # of z
        else:
            self.density = coding.FactorizedDensity(m, support=cfg.support)  # of y

    @property
    def stride(self) -> int:
        return 64 if self.cfg.hyperprior else 16

    def forward(self, x01: torch.Tensor, noise: bool = True):
        """(x̂, per-image bits of y, per-image bits of z) with ŷ = y + U (training) or the
        codec's quantization (evaluation)."""

        def q(v):
            if noise:
                return v + torch.empty_like(v).uniform_(-0.5, 0.5)
            return coding.quantize(v, self.cfg.support)

        y = self.g_a(x01).float()
        y_hat = q(y)
        # The entropy model runs in float32 under AMP too: float16 would floor likelihoods at
        # 0 (infinite rates), coarsen them, and make the rate the decoder uses differ.
        with torch.autocast(x01.device.type, enabled=False):
            if self.cfg.hyperprior:
                z = self.h_a(y.abs())
                z_hat = q(z)
                bits_z = -torch.log2(self.density.likelihood(z_hat)).flatten(1).sum(1)
                scales = self.h_s(z_hat)
                bits_y = -torch.log2(coding.gaussian_likelihood(y_hat, scales)).flatten(1)
                bits_y = bits_y.sum(1)
            else:
                bits_y = -torch.log2(self.density.likelihood(y_hat)).flatten(1).sum(1)
                bits_z = torch.zeros_like(bits_y)
        return self.g_s(y_hat), bits_y, bits_z


class Codec(GenerativeModel):
    sampler = "codec"

    def __init__(self, cfg: CodecConfig, info: DataInfo):
        super().__init__()
        self.cfg, self.info = cfg, info
        self.codec = CodecNet(cfg, info.channels)

    def trainable(self):
        return {"codec": self.codec}

    def phases(self):
        return [Phase("rd", "codec")]

    def optim_config(self, module):
        return self.cfg.optim

    def loss(self, phase: str, batch: Batch, nets: Mapping[str, nn.Module]):
        x01 = (batch.images + 1) / 2
        x_hat, bits_y, bits_z = nets["codec"](x01)
        pixels = x01.shape[2] * x01.shape[3]
        bpp = ((bits_y + bits_z) / pixels).mean()
        mse = F.mse_loss(x_hat, x01)
        loss = self.cfg.lmbda * 255**2 * mse + bpp
        psnr = -10 * math.log10(max(mse.item(), 1e-10))
        return loss, {"bpp": bpp.item(), "mse": mse.item(), "psnr": psnr}

    @torch.no_grad()
    def rate_distortion(self, images: torch.Tensor) -> dict[str, float]:
        """Estimated bpp (from the likelihoods of the quantized latents) and PSNR of the
        quantized reconstruction, over a batch of images in [−1, 1]."""
        x01 = (images + 1) / 2
        x_hat, bits_y, bits_z = self.codec(x01, noise=False)
        mse = F.mse_loss(x_hat.clamp(0, 1), x01).item()
        pixels = x01.shape[0] * x01.shape[2] * x01.shape[3]
        return {"bpp_estimate": float((bits_y + bits_z).sum()) / pixels,
                "psnr": -10 * math.log10(max(mse, 1e-10))}  # fmt: skip

    # -- real bitstreams --------------------------------------------------------------------

    def freeze(self) -> None:
        """Fix the coding tables (and so the model id) for compress/decompress."""
        self.codec.density.freeze()

    def model_id(self) -> bytes:
        """16 bytes identifying the weights and tables: a file made by another model is
        refused, not decoded into noise."""
        h = hashlib.sha256()
        for k, v in sorted(self.codec.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return h.digest()[:16]

    def _pad(self, x01: torch.Tensor) -> torch.Tensor:
        s = self.codec.stride
        h, w = x01.shape[2:]
        return F.pad(x01, (0, (-w) % s, 0, (-h) % s), mode="replicate")

    @torch.no_grad()
    def compress(self, image01: torch.Tensor) -> coding.Packed:
        """One image (C, H, W) in [0, 1] → the packed streams."""
        if not self.codec.density.frozen:
            self.freeze()
        self.eval()
        c, h, w = image01.shape
        x = self._pad(image01[None].float())
        net, r = self.codec, self.cfg.support
        y = net.g_a(x)
        y_hat = coding.quantize(y, r)
        if self.cfg.hyperprior:
            z_hat = coding.quantize(net.h_a(y.abs()), r)
            scales = net.h_s(z_hat)
            streams = [coding.encode_factorized(z_hat, net.density),
                       coding.encode_gaussian(y_hat, scales, r)]  # fmt: skip
            shapes = [tuple(z_hat.shape[1:]), tuple(y_hat.shape[1:])]
        else:
            streams = [coding.encode_factorized(y_hat, net.density)]
            shapes = [tuple(y_hat.shape[1:])]
        return coding.Packed(self.model_id(), h, w, c, shapes, streams)

    @torch.no_grad()
    def decompress(self, packed: coding.Packed, name: str = "<bytes>") -> torch.Tensor:
        """The packed streams → the image (C, H, W) in [0, 1]."""
        from gm.errors import DataError

        if not self.codec.density.frozen:
            self.freeze()
        if packed.model_id != self.model_id():
            raise DataError(
                f"{name}: made by another codec model (id {packed.model_id.hex()}, this "
                f"model is {self.model_id().hex()})"
            )
        self.eval()
        net, r = self.codec, self.cfg.support
        if self.cfg.hyperprior:
            z_hat = coding.decode_factorized(packed.streams[0], packed.shapes[0], net.density)
            scales = net.h_s(z_hat)
            y_hat = coding.decode_gaussian(packed.streams[1], scales, r)
        else:
            y_hat = coding.decode_factorized(packed.streams[0], packed.shapes[0], net.density)
        x_hat = net.g_s(y_hat).clamp(0, 1)
        return x_hat[0, :, : packed.height, : packed.width]

    @torch.no_grad()
    def reconstruct(self, image01: torch.Tensor) -> torch.Tensor:
        """The model's quantized reconstruction, without coding (what decompress must give)."""
        self.eval()
        x = self._pad(image01[None].float())
        y_hat = coding.quantize(self.codec.g_a(x), self.cfg.support)
        return self.codec.g_s(y_hat).clamp(0, 1)[0, :, : image01.shape[1], : image01.shape[2]]

    # -- the generative-model protocol (sample grids) ---------------------------------------

    def latent_shape(self):
        s = self.info.resolution // 16
        return (self.cfg.m, max(s, 1), max(s, 1))

    def generator(self, nets=None):
        return CodecDecoder((nets or {}).get("codec", self.codec))

    @torch.no_grad()
    def sample(self, n, labels=None, generator=None, nets=None):
        """Images decoded from random latents scaled like the code's typical spread: a look
        at what the synthesis transform makes (a codec is not trained to sample)."""
        dec = self.generator(nets)
        device = next(dec.parameters()).device
        z = torch.randn(n, *self.latent_shape(), generator=generator).to(device)
        return dec(z, torch.zeros(n, dtype=torch.long, device=device))


class CodecDecoder(nn.Module):
    """(latents, labels) → images in [−1, 1]: the synthesis transform on rounded latents."""

    def __init__(self, net: CodecNet):
        super().__init__()
        self.net = net

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.net.g_s(torch.round(z * 4)).clamp(0, 1) * 2 - 1


@register("codec", CodecConfig, "Ballé et al., ICLR 2018 (factorized prior, scale hyperprior)")
def build_codec(cfg: CodecConfig, info: DataInfo) -> Codec:
    return Codec(cfg, info)
