"""Learned image codecs (Ballé, Minnen, Singh, Hwang & Johnston, ICLR 2018): the
factorized-prior model and the scale-hyperprior model.

x ∈ [0, 1] → analysis g_a (four 5×5 stride-2 convolutions with GDN) → y → quantized ŷ →
synthesis g_s (transposed convolutions with inverse GDN) → x̂. The factorized model codes ŷ
with a learned per-channel density; the hyperprior model sends side information
z = h_a(|y|), coded with a factorized density, from which h_s(ẑ) predicts the scale of a
zero-mean Gaussian per element of ŷ. ``context: autoregressive`` is Minnen, Ballé & Toderici
(NeurIPS 2018): a masked 5×5 convolution over the ŷ decoded so far and h_s(ẑ) feed 1×1
"entropy parameters" layers that give each element's Gaussian mean and scale; decoding is
serial over latent positions. Training minimizes λ·255²·MSE + R (bits per pixel,
from the likelihoods of ŷ + U(−½, ½)), the paper's rate–distortion Lagrangian with
CompressAI's λ scale. Real bitstreams: :meth:`Codec.compress` / :meth:`Codec.decompress`
(:mod:`gm.codec`), after :meth:`Codec.freeze`: the entropy parameters come from integer
copies of the networks (:class:`gm.codec.IntegerNet`), so a file decodes to the same latents on
every machine, and the file's latent CRC-32 turns any mismatch into an error.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
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
    # "autoregressive": Minnen et al. 2018's joint autoregressive + hierarchical prior (a
    # masked 5×5 context model; Gaussian means and scales); needs hyperprior
    context: str = "none"
    n: int = 128  # channels of the transforms (paper: 128 for low rates, 192 for high)
    m: int = 192  # channels of y (paper: 192 / 320)
    lmbda: float = 0.01  # λ of λ·255²·MSE + bpp (CompressAI's scale: 0.0018 … 0.0932)
    support: int = 64  # latents are coded in [−support, support]
    # the learning rate drops 10× after this fraction of the run's steps (1: never), as
    # CompressAI's recipes lower it for the last part of training
    lr_drop: float = 1.0
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-4, betas=(0.9, 0.999), grad_clip=1.0)
    )

    def __post_init__(self):
        check(self.n >= 1 and self.m >= 1, "n", "channel counts must be >= 1")
        check(self.lmbda > 0, "lmbda", "must be > 0")
        check(1 <= self.support <= 4096, "support", "must be in 1..4096")
        check(0 < self.lr_drop <= 1, "lr_drop", f"{self.lr_drop} must be in (0, 1]")
        check(self.context in ("none", "autoregressive"), "context",
              f"{self.context!r}: must be none or autoregressive")  # fmt: skip
        check(self.context == "none" or self.hyperprior, "context",
              "the autoregressive context model needs hyperprior: true")  # fmt: skip


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
        self.integer: dict[str, coding.IntegerNet] = {}  # frozen by freeze_integer()
        if cfg.context == "autoregressive":  # Minnen et al. 2018, fig. 4 (ReLU for LeakyReLU)
            n3 = 3 * n // 2
            self.h_a = nn.Sequential(_conv(m, n, 3, 1), nn.ReLU(), _conv(n, n), nn.ReLU(),
                                     _conv(n, n))  # fmt: skip
            self.h_s = nn.Sequential(_deconv(n, n), nn.ReLU(), _deconv(n, n3), nn.ReLU(),
                                     _conv(n3, 2 * m, 3, 1))  # fmt: skip
            self.context = coding.MaskedConv2d(m, 2 * m, 5)
            self.entropy_parameters = nn.Sequential(
                nn.Conv2d(4 * m, 10 * m // 3, 1), nn.ReLU(),
                nn.Conv2d(10 * m // 3, 8 * m // 3, 1), nn.ReLU(),
                nn.Conv2d(8 * m // 3, 2 * m, 1))  # fmt: skip
            self.density = coding.FactorizedDensity(n, support=cfg.support)  # of z
        elif cfg.hyperprior:
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
            if self.cfg.context == "autoregressive":
                z_hat = q(self.h_a(y))
                bits_z = -torch.log2(self.density.likelihood(z_hat)).flatten(1).sum(1)
                means, scales = self.gaussian_parameters(y_hat, z_hat)
                bits_y = -torch.log2(coding.gaussian_likelihood(y_hat - means, scales))
                bits_y = bits_y.flatten(1).sum(1)
            elif self.cfg.hyperprior:
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

    def gaussian_parameters(self, y_hat: torch.Tensor, z_hat: torch.Tensor):
        """Context model: (means, scales) of ŷ (B, M, H, W) from the masked convolution of ŷ
        and the hyper-synthesis of ẑ, in one parallel pass (float; training and estimates)."""
        params = self.entropy_parameters(torch.cat([self.context(y_hat), self.h_s(z_hat)], 1))
        return params.chunk(2, dim=1)

    # -- the integer copies the bitstreams use -----------------------------------------------

    def freeze_integer(self) -> None:
        """Build the integer networks (gm.codec.IntegerNet) that choose the entropy-coding
        parameters, from the current float weights."""
        r = self.cfg.support
        self.integer = {}
        if self.cfg.hyperprior:
            self.integer["h_s"] = coding.IntegerNet(self.h_s, 0, r)
        if self.cfg.context == "autoregressive":
            self.integer["context"] = coding.IntegerNet(self.context, 0, r)
            self.integer["entropy_parameters"] = coding.IntegerNet(  # on the two nets' outputs
                self.entropy_parameters, coding.FRAC_BITS, coding.OUTPUT_BOUND
            )

    def integer_parameters(self, z_hat: torch.Tensor, y_hat: torch.Tensor | None = None):
        """(means or None, scales) of ŷ as integers at FRAC_BITS, (1, M, H, W) float64: the
        hyperprior's scales, or the context model's means and scales given all of ŷ (the
        encoder's parallel pass; the decoder's serial pass gives the same integers)."""
        hyper = self.integer["h_s"](z_hat)
        if self.cfg.context != "autoregressive":
            return None, hyper
        ctx = self.integer["context"](y_hat)
        means, scales = self.integer["entropy_parameters"](torch.cat([ctx, hyper], 1)).chunk(2, 1)
        return means, scales

    def decode_context(self, decode, z_hat: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """The context model's serial decode: ŷ (1, M, H, W), one latent position at a time in
        raster order, each position's means and scales computed by the same integer layers
        from the ŷ decoded so far (numpy float64 on integers: exact, like the encoder's)."""
        m, h, w = shape
        hyper = self.integer["h_s"](z_hat)[0].numpy()
        ctx = self.integer["context"].layers[0]
        k = ctx.weight.shape[-1]
        w_ctx = ctx.weight.reshape(ctx.weight.shape[0], -1).numpy()
        b_ctx = ctx.bias.numpy()
        ep = [(layer, layer.weight[:, :, 0, 0].numpy(), layer.bias.numpy())
              for layer in self.integer["entropy_parameters"].layers]  # fmt: skip
        pad = k // 2
        y = np.zeros((m, h + 2 * pad, w + 2 * pad))
        r = self.cfg.support
        for i in range(h):
            for j in range(w):
                v = ctx.requantize(w_ctx @ y[:, i : i + k, j : j + k].reshape(-1) + b_ctx)
                v = np.concatenate([v, hyper[:, i, j]])
                for layer, weight, bias in ep:
                    v = layer.requantize(weight @ v + bias)
                means = coding.gaussian_means(v[:m], r)
                y[:, i + pad, j + pad] = decode(means, coding.gaussian_stds(v[m:]))
        return torch.from_numpy(y[:, pad : pad + h, pad : pad + w]).float()[None]


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

    def lr_factor(self, step: int, total_steps: int) -> float:
        drop = total_steps > 0 and self.cfg.lr_drop < 1 and step >= self.cfg.lr_drop * total_steps
        return 0.1 if drop else 1.0

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
        quantized reconstruction, over a batch of images in [−1, 1]. Sides that are not a
        multiple of the stride are padded as :meth:`compress` pads them (the estimate is of
        the file's bits; PSNR over the image's own pixels)."""
        x01 = (images + 1) / 2
        h, w = x01.shape[2:]
        x_hat, bits_y, bits_z = self.codec(self._pad(x01), noise=False)
        mse = F.mse_loss(x_hat[..., :h, :w].clamp(0, 1), x01).item()
        pixels = x01.shape[0] * x01.shape[2] * x01.shape[3]
        return {"bpp_estimate": float((bits_y + bits_z).sum()) / pixels,
                "psnr": -10 * math.log10(max(mse, 1e-10))}  # fmt: skip

    # -- real bitstreams --------------------------------------------------------------------

    def freeze(self, recompute_tables: bool = True) -> None:
        """Fix the coding tables (and so the model id) and build the integer networks, for
        compress/decompress. ``recompute_tables=False`` keeps tables already there (those a
        checkpoint carries: computed where the model was trained, the same for every
        decoder)."""
        if recompute_tables or not self.codec.density.frozen:
            self.codec.density.freeze()
        self.codec.freeze_integer()
        self._model_id = self._weights_id()

    @property
    def frozen(self) -> bool:
        return (self.codec.density.frozen and hasattr(self, "_model_id")
                and (not self.cfg.hyperprior or bool(self.codec.integer)))  # fmt: skip

    def model_id(self) -> bytes:
        """16 bytes identifying the weights and tables (fixed by :meth:`freeze`): a file made
        by another model is refused, not decoded into noise."""
        if not self.frozen:
            self.freeze()
        return self._model_id

    def _weights_id(self) -> bytes:
        # parameters and persistent buffers, read directly: state_dict() would recompute the
        # coding tables (FactorizedDensity saves the tables of the weights it saves)
        h = hashlib.sha256()
        named = [*self.codec.named_parameters(), *self.codec.named_buffers()]
        for k, v in sorted(named, key=lambda kv: kv[0]):
            if k.endswith("mask"):
                continue  # the context model's fixed mask: not a weight
            t = v.detach().cpu()
            if t.is_floating_point() and not k.endswith("pmf"):
                t = t.float()  # a float64 copy of the same weights is the same model
            h.update(k.encode())
            h.update(t.contiguous().numpy().tobytes())
        return h.digest()[:16]

    def _pad(self, x01: torch.Tensor) -> torch.Tensor:
        s = self.codec.stride
        h, w = x01.shape[2:]
        return F.pad(x01, (0, (-w) % s, 0, (-h) % s), mode="replicate")

    @torch.no_grad()
    def compress(self, image01: torch.Tensor) -> coding.Packed:
        """One image (C, H, W) in [0, 1] → the packed streams."""
        if not self.frozen:
            self.freeze()
        self.eval()
        c, h, w = image01.shape
        net, r = self.codec, self.cfg.support
        x = self._pad(image01[None].to(next(net.g_a.parameters()).dtype))
        y = net.g_a(x)
        y_hat = coding.quantize(y, r).float()
        if self.cfg.hyperprior:
            z_hat = coding.quantize(net.h_a(y if self.cfg.context != "none" else y.abs()), r)
            means_q, scales_q = net.integer_parameters(z_hat, y_hat)
            if means_q is None:  # channel-major order, zero means
                symbols, means = y_hat.flatten(), torch.zeros(y_hat.numel())
            else:  # position-major (raster) order, the context model's decoding order
                symbols, means, scales_q = (t[0].permute(1, 2, 0).reshape(-1)
                                            for t in (y_hat, means_q, scales_q))  # fmt: skip
            stds = coding.gaussian_stds(scales_q)
            means = coding.gaussian_means(means, r)
            symbols = symbols.to(torch.int64).numpy()
            streams = [coding.encode_factorized(z_hat, net.density),
                       coding.encode_gaussian(symbols, means, stds, r)]  # fmt: skip
            latents = [z_hat, y_hat]
        else:
            streams = [coding.encode_factorized(y_hat, net.density)]
            latents = [y_hat]
        shapes = [tuple(q.shape[1:]) for q in latents]
        return coding.Packed(self.model_id(), h, w, c, shapes, streams,
                             coding.latent_crc(latents))  # fmt: skip

    @torch.no_grad()
    def decode_latents(self, packed: coding.Packed, name: str = "<bytes>") -> list[torch.Tensor]:
        """The packed streams → the integer latents ([ẑ, ŷ] or [ŷ], each (1, C, H, W)),
        checked against the file's latent CRC-32.

        Raises DataError naming ``name`` for a file of another model or a decode whose latents
        differ from the encoder's (the entropy decoder desynchronized)."""
        from gm.errors import DataError

        if not self.frozen:
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
            decode = coding.gaussian_decoder(packed.streams[1], r)
            shape = packed.shapes[1]
            if self.cfg.context == "autoregressive":
                y_hat = net.decode_context(decode, z_hat, shape)
            else:
                _, scales_q = net.integer_parameters(z_hat)
                if tuple(scales_q.shape[1:]) != tuple(shape):
                    raise DataError(f"{name}: latent shapes {packed.shapes} do not fit this "
                                    "codec")  # fmt: skip
                stds = coding.gaussian_stds(scales_q)
                y_hat = torch.from_numpy(decode(np.zeros_like(stds), stds)).float()
                y_hat = y_hat.reshape(1, *shape)
            latents = [z_hat, y_hat]
        else:
            latents = [coding.decode_factorized(packed.streams[0], packed.shapes[0], net.density)]
        crc = coding.latent_crc(latents)
        if crc != packed.latent_crc:
            raise DataError(
                f"{name}: decoding desynchronized (the decoded latents' CRC-32 {crc:08x} is not "
                f"the encoder's {packed.latent_crc:08x}): the entropy parameters differ between "
                "the machine that wrote the file and this one; no image written"
            )
        return latents

    @torch.no_grad()
    def decompress(self, packed: coding.Packed, name: str = "<bytes>") -> torch.Tensor:
        """The packed streams → the image (C, H, W) in [0, 1].

        Raises DataError naming ``name`` (see :meth:`decode_latents`)."""
        y_hat = self.decode_latents(packed, name)[-1]
        x_hat = self.codec.g_s(y_hat.to(next(self.codec.g_s.parameters()).dtype)).clamp(0, 1)
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


@register(
    "codec",
    CodecConfig,
    "Ballé et al., ICLR 2018 (factorized prior, scale hyperprior); "
    "Minnen et al., NeurIPS 2018 (context: autoregressive)",
)
def build_codec(cfg: CodecConfig, info: DataInfo) -> Codec:
    return Codec(cfg, info)
