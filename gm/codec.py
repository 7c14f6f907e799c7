"""Entropy models and real bitstreams for the learned image codec (Ballé et al., ICLR 2018).

- :class:`FactorizedDensity`: the non-parametric per-channel density of Ballé's "entropy
  bottleneck" (a monotone MLP gives each channel's CDF). Its likelihood of a quantized value
  is CDF(v + ½) − CDF(v − ½); training sees v + U(−½, ½) noise.
- :func:`gaussian_likelihood`: the scale hyperprior's conditional, a zero-mean Gaussian
  integrated over the quantization bin, with a floor on the scale.
- **Coding** with constriction's ANS coder (``constriction.stream.stack``): latents are
  rounded and clamped to ``[-R, R]`` (that *is* the model's quantization, so decoding gives the
  model's quantized reconstruction exactly); factorized channels use categorical tables the
  model freezes once with :meth:`FactorizedDensity.freeze` (stored in its state dict, so
  encoder and decoder read the same numbers), Gaussian ones use constriction's quantized
  Gaussian at scales snapped to a fixed log-spaced table.
- **Decoding that does not depend on floating point.** Everything the decoder computes to
  choose entropy-coding parameters (the hyperprior's scales, the context model's means and
  scales) runs in an :class:`IntegerNet`: a frozen copy of the float network whose weights,
  biases and activations are integers (fixed point, :data:`FRAC_BITS` fractional bits), after
  Ballé, Johnston & Minnen, "Integer networks for data compression with latent-variable
  models" (ICLR 2019). Its convolutions run in float64 on integer values whose every partial
  sum stays below 2**53, so each sum is exact in any order: another CPU, thread count, BLAS or
  oneDNN on/off gives the same integers. Scales snap to a table of dyadic numbers
  (:data:`SCALE_TABLE_Q` / 2**FRAC_BITS) by integer comparison.
- **Files** (:func:`pack`, :func:`unpack`): a header (magic, format version, the model id, the
  image size, a CRC-32 of the decoded integer latents, the latent shapes, stream lengths, a
  CRC-32 of the file) then the streams. A truncated, corrupted or foreign file, or one made by
  another model, is refused with a clear error; so is a decode whose latents do not match
  the encoder's (a desynchronized entropy decoder), instead of a wrong image.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gm.errors import DataError

MAGIC = b"GMC\x01"
FORMAT_VERSION = 2  # 2: integer entropy parameters and the latents' CRC-32 in the header
SCALE_MIN, SCALE_MAX, SCALE_LEVELS = 0.11, 256.0, 64
FRAC_BITS = 10  # fixed-point fractional bits of the integer networks' activations
WEIGHT_BOUND = 2**14  # |integer weight| < this, per layer
ACT_BOUND = 2**22  # |integer activation| < this (clamped)
EXACT_BOUND = 2**52  # every partial sum of a layer stays below this: exact in float64
OUTPUT_BOUND = ACT_BOUND / 2**FRAC_BITS  # |an IntegerNet's output| in real units (its in_bound)

# CompressAI's 64 log-spaced scales from 0.11 to 256, as integers at FRAC_BITS (each is at
# least 0.007 from a rounding tie, so any libm's exp gives the same table).
SCALE_TABLE_Q = tuple(
    round(math.exp(math.log(SCALE_MIN) + i * math.log(SCALE_MAX / SCALE_MIN) / (SCALE_LEVELS - 1))
          * 2**FRAC_BITS) for i in range(SCALE_LEVELS)
)  # fmt: skip


def scale_table() -> torch.Tensor:
    """The Gaussian scales coding uses (float64, exact dyadic numbers): 64 levels, 0.11 … 256."""
    return torch.tensor(SCALE_TABLE_Q, dtype=torch.float64) / 2**FRAC_BITS


class LowerBound(torch.autograd.Function):
    """max(x, bound) whose gradient still pulls x up when it is below (Ballé's trick)."""

    @staticmethod
    def forward(ctx, x, bound):
        ctx.save_for_backward(x)
        ctx.bound = bound
        return x.clamp(min=bound)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        pass_through = (x >= ctx.bound) | (grad < 0)
        return grad * pass_through, None


def gaussian_likelihood(y: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """P(ŷ) of a zero-mean Gaussian over the bin [ŷ − ½, ŷ + ½], computed on the upper tail."""
    scales = LowerBound.apply(scales, SCALE_MIN)
    v = y.abs()
    normal = torch.distributions.Normal(0.0, 1.0)
    upper = normal.cdf((0.5 - v) / scales)
    lower = normal.cdf((-0.5 - v) / scales)
    return LowerBound.apply(upper - lower, 1e-9)


class FactorizedDensity(nn.Module):
    """Per-channel learned CDF c(x) = σ(f_K(… f_1(x))), each f_k(x) = softplus(H_k) x + b_k
    + tanh(a_k) ⊙ tanh(softplus(H_k) x + b_k), monotone by construction (Ballé 2018, app. 6.1)."""

    def __init__(self, channels: int, filters: tuple[int, ...] = (3, 3, 3), init_scale=10.0,
                 support: int = 64):  # fmt: skip
        super().__init__()
        dims = (1, *filters, 1)
        scale = init_scale ** (1 / (len(filters) + 1))
        self.matrices, self.biases, self.factors = (nn.ParameterList() for _ in range(3))
        for i in range(len(filters) + 1):
            init = math.log(math.expm1(1 / scale / dims[i + 1]))
            self.matrices.append(nn.Parameter(torch.full((channels, dims[i + 1], dims[i]), init)))
            self.biases.append(nn.Parameter(torch.rand(channels, dims[i + 1], 1) - 0.5))
            if i < len(filters):
                self.factors.append(nn.Parameter(torch.zeros(channels, dims[i + 1], 1)))
        self.support = support
        # the coding tables, frozen by `freeze` (float64 probabilities per channel)
        self.register_buffer("pmf", torch.zeros(channels, 2 * support + 1, dtype=torch.float64))

    def logits_cdf(self, x: torch.Tensor) -> torch.Tensor:
        """x: (C, 1, N) → the pre-sigmoid CDF at x, (C, 1, N)."""
        h = x
        for i, m in enumerate(self.matrices):
            h = torch.matmul(F.softplus(m), h) + self.biases[i]
            if i < len(self.factors):
                h = h + torch.tanh(self.factors[i]) * torch.tanh(h)
        return h

    def likelihood(self, y: torch.Tensor) -> torch.Tensor:
        """P(ŷ) per element of y (B, C, H, W), on the bin [ŷ − ½, ŷ + ½]."""
        b, c, h, w = y.shape
        v = y.permute(1, 0, 2, 3).reshape(c, 1, -1)
        lower, upper = self.logits_cdf(v - 0.5), self.logits_cdf(v + 0.5)
        sign = -torch.sign(lower + upper).detach()  # subtract on the tail nearer to 0 or 1
        p = (torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower)).abs()
        p = LowerBound.apply(p, 1e-9)
        return p.reshape(c, b, h, w).permute(1, 0, 2, 3)

    @torch.no_grad()
    def freeze(self) -> None:
        """Compute the coding tables: each channel's probability of every integer in
        [−support, support] (the edges take the tails), as stored float64 numbers."""
        c = self.pmf.shape[0]
        r = self.support
        device = self.matrices[0].device
        edges = torch.arange(-r, r + 2, dtype=torch.float32, device=device) - 0.5  # 2r + 2
        cdf = torch.sigmoid(self.logits_cdf(edges.expand(c, 1, -1).contiguous()))[:, 0]
        cdf = cdf.double()
        cdf[:, 0], cdf[:, -1] = 0.0, 1.0
        self.pmf.copy_((cdf[:, 1:] - cdf[:, :-1]).clamp(min=1e-12))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # Every saved state (checkpoints) carries the coding tables of the weights it saves,
        # computed once on the machine that trained them: a decoder reads these numbers and
        # never recomputes them with its own (maybe different) transcendental functions.
        self.freeze()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    @property
    def frozen(self) -> bool:
        return bool(self.pmf.sum() > 0)


def quantize(y: torch.Tensor, support: int) -> torch.Tensor:
    """The codec's quantization: round, then clamp to the coded range."""
    return torch.round(y).clamp(-support, support)


# -- bitstreams -------------------------------------------------------------------------------


def encode_factorized(q: torch.Tensor, density: FactorizedDensity) -> bytes:
    """ANS-code integer latents q (1, C, H, W) with each channel's frozen table."""
    import constriction

    if not density.frozen:
        raise RuntimeError("freeze() the factorized density before coding")
    r = density.support
    coder = constriction.stream.stack.AnsCoder()
    symbols = (q[0].to(torch.int64) + r).reshape(q.shape[1], -1).numpy().astype(np.int32)
    for ch in reversed(range(q.shape[1])):  # ANS is a stack: encode in reverse
        model = constriction.stream.model.Categorical(density.pmf[ch].numpy(), perfect=False)
        coder.encode_reverse(symbols[ch], model)
    return coder.get_compressed().tobytes()


def decode_factorized(data: bytes, shape: tuple[int, ...], density: FactorizedDensity):
    import constriction

    r = density.support
    c, n = shape[0], math.prod(shape[1:])
    coder = constriction.stream.stack.AnsCoder(_words(data))
    out = np.empty((c, n), dtype=np.int64)
    for ch in range(c):
        model = constriction.stream.model.Categorical(density.pmf[ch].numpy(), perfect=False)
        out[ch] = coder.decode(model, n)
    return torch.from_numpy(out - r).float().reshape(1, *shape)


def scale_indexes(scales_q: torch.Tensor) -> torch.Tensor:
    """Index of the table scale at or above each predicted scale, for integer scales at
    FRAC_BITS (an IntegerNet's output): integer comparisons, the same on every machine."""
    return torch.from_numpy(_snap(scales_q)).reshape(scales_q.shape)


_TABLE_Q = np.array(SCALE_TABLE_Q, dtype=np.float64)


def _flat(v) -> np.ndarray:
    v = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
    return v.astype(np.float64, copy=False).ravel()


def _snap(scales_q) -> np.ndarray:
    """Flat table indexes (int64) of integer scales: the first table scale at or above."""
    return np.minimum(np.searchsorted(_TABLE_Q, _flat(scales_q)), SCALE_LEVELS - 1)


def gaussian_stds(scales_q) -> np.ndarray:
    """The coding standard deviations (float64, flat) of integer scales at FRAC_BITS (a
    tensor or array): each snapped up to the table by integer comparison."""
    return _TABLE_Q[_snap(scales_q)] / 2**FRAC_BITS


def gaussian_means(means_q, support: int) -> np.ndarray:
    """The coding means (float64, flat, exact: integers at FRAC_BITS over 2**FRAC_BITS)."""
    bound = support * 2**FRAC_BITS
    return np.clip(_flat(means_q), -bound, bound) / 2**FRAC_BITS


def encode_gaussian(symbols: np.ndarray, means: np.ndarray, stds: np.ndarray,
                    support: int) -> bytes:  # fmt: skip
    """ANS-code integer symbols (flat) with quantized Gaussians of the given means and
    standard deviations (flat float64), in order: :func:`gaussian_decoder` returns them so."""
    import constriction

    coder = constriction.stream.stack.AnsCoder()
    model = constriction.stream.model.QuantizedGaussian(-support, support)
    coder.encode_reverse(symbols.astype(np.int32), model, means, stds)
    return coder.get_compressed().tobytes()


def gaussian_decoder(data: bytes, support: int):
    """A function (means, stds) → the next len(means) symbols (int64) of a Gaussian stream;
    called in the encoder's order, in as many pieces as the decoder needs (the context model
    decodes one latent position at a time)."""
    import constriction

    coder = constriction.stream.stack.AnsCoder(_words(data))
    model = constriction.stream.model.QuantizedGaussian(-support, support)

    def decode(means: np.ndarray, stds: np.ndarray) -> np.ndarray:
        return coder.decode(model, means, stds).astype(np.int64)

    return decode


def latent_crc(latents: list[torch.Tensor]) -> int:
    """CRC-32 of integer latents (int32 little-endian, in order): the file carries the
    encoder's, the decoder checks its own against it."""
    crc = 0
    for q in latents:
        crc = zlib.crc32(q.detach().cpu().to(torch.int32).numpy().astype("<i4").tobytes(), crc)
    return crc


# -- integer networks ------------------------------------------------------------------------


class MaskedConv2d(nn.Conv2d):
    """A k×k convolution that sees only the latents before the centre in raster order (mask
    "A" of PixelCNN, van den Oord et al. 2016): Minnen et al. 2018's context model.
    (B, C_in, H, W) → (B, C_out, H, W)."""

    def __init__(self, cin: int, cout: int, k: int = 5):
        super().__init__(cin, cout, k, padding=k // 2)
        mask = torch.ones(cout, cin, k, k)
        mask[:, :, k // 2, k // 2 :] = 0
        mask[:, :, k // 2 + 1 :] = 0
        self.register_buffer("mask", mask, persistent=False)

    def masked_weight(self) -> torch.Tensor:
        return self.weight * self.mask

    def forward(self, x):
        return F.conv2d(x, self.masked_weight(), self.bias, padding=self.padding)


@dataclass
class IntegerLayer:
    """One convolution of an :class:`IntegerNet`: integer weights (float64 holding integers)
    at 2**e, integer bias at 2**(e + a) for inputs at 2**a, and the rescale to FRAC_BITS."""

    weight: torch.Tensor  # (out, in, kh, kw), or (in, out, kh, kw) transposed
    bias: torch.Tensor  # (out,)
    transposed: bool
    stride: int
    padding: int
    output_padding: int
    shift: int  # output = floor(acc · 2**shift), then ReLU if relu, clamped to ±ACT_BOUND
    relu: bool

    def requantize(self, acc):
        """Integer accumulators → activations at FRAC_BITS (torch or numpy float64)."""
        lib = torch if isinstance(acc, torch.Tensor) else np
        v = lib.floor(acc * 2.0**self.shift)
        lo = 0 if self.relu else -(ACT_BOUND - 1)
        return lib.clip(v, lo, ACT_BOUND - 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.transposed:
            acc = F.conv_transpose2d(x, self.weight, self.bias, self.stride, self.padding,
                                     self.output_padding)  # fmt: skip
        else:
            acc = F.conv2d(x, self.weight, self.bias, self.stride, self.padding)
        return self.requantize(acc)


class IntegerNet:
    """A frozen integer copy of a float network of Conv2d / ConvTranspose2d / MaskedConv2d
    layers, each optionally followed by ReLU (Ballé, Johnston & Minnen, ICLR 2019).

    Input: integers at 2**in_frac (in_frac 0: quantized latents) of real value |x| ≤ in_bound,
    i.e. integers of magnitude ≤ in_bound·2**in_frac (outputs of another IntegerNet:
    in_frac FRAC_BITS, in_bound OUTPUT_BOUND). Output:
    integers at 2**FRAC_BITS, i.e. output / 2**FRAC_BITS ≈ the float network's output. Every
    layer's weights are rounded at the largest power of two that keeps them below
    WEIGHT_BOUND, activations are floored to FRAC_BITS and clamped below ACT_BOUND, and the
    construction checks that no partial sum can reach EXACT_BOUND, so float64 arithmetic on
    these integers is exact whatever the order of the sums (threads, BLAS, CPU).

    Raises ValueError for a layer it cannot make exact (possible from a fan-in of about 2**15
    on inputs of another IntegerNet: 2**22 · 2**14 · fan-in must stay below 2**52)."""

    def __init__(self, net: nn.Module, in_frac: int = 0, in_bound: float = 4096):
        mods = list(net) if isinstance(net, nn.Sequential) else [net]
        self.layers: list[IntegerLayer] = []
        a, bound = in_frac, in_bound * 2**in_frac
        for i, m in enumerate(mods):
            if isinstance(m, nn.ReLU):
                continue
            if not isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                raise ValueError(f"IntegerNet: cannot convert layer {i} ({type(m).__name__})")
            relu = i + 1 < len(mods) and isinstance(mods[i + 1], nn.ReLU)
            w = (m.masked_weight() if isinstance(m, MaskedConv2d) else m.weight).detach()
            w = w.double().cpu()
            b = (m.bias.detach() if m.bias is not None else torch.zeros(w.shape[0])).double()
            transposed = isinstance(m, nn.ConvTranspose2d)
            e = WEIGHT_BOUND.bit_length() - 1 - math.frexp(float(w.abs().max()) or 1.0)[1]
            b_max = float(b.abs().max())
            if b_max > 0:  # keep the bias below 2**48 as well
                e = min(e, 48 - a - math.frexp(b_max)[1])
            e = min(e, 40)
            w_q = torch.round(w * 2.0**e)
            b_q = torch.round(b.cpu() * 2.0 ** (e + a))
            per_out = w_q.abs().sum(dim=tuple(d for d in range(4) if d != (1 if transposed else 0)))
            worst = float(per_out.max()) * bound + float(b_q.abs().max())
            if worst >= EXACT_BOUND:
                raise ValueError(f"IntegerNet: layer {i} could reach {worst:.3g} ≥ 2**52 "
                                 f"(fan-in {int(w[0].numel())}): not exact in float64")  # fmt: skip
            self.layers.append(IntegerLayer(
                w_q, b_q, transposed, m.stride[0], m.padding[0],
                m.output_padding[0] if transposed else 0, FRAC_BITS - e - a, relu))  # fmt: skip
            a, bound = FRAC_BITS, ACT_BOUND

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) integers at 2**in_frac → integers at 2**FRAC_BITS (float64)."""
        with torch.no_grad():
            h = x.detach().cpu().double()
            for layer in self.layers:
                h = layer(h)
            return h

    def state(self) -> list[torch.Tensor]:
        """The integer weights and biases (for a model id)."""
        return [t for layer in self.layers for t in (layer.weight, layer.bias)]


def _words(data: bytes) -> np.ndarray:
    if len(data) % 4:
        raise DataError("a stream is not a whole number of 32-bit words")
    return np.frombuffer(data, dtype=np.uint32).copy()


# -- files ------------------------------------------------------------------------------------

# magic, version, model id, height, width, channels, the latents' CRC-32, number of streams
_HEADER = struct.Struct("<4sB16sIIBIB")


@dataclass
class Packed:
    model_id: bytes  # 16 bytes
    height: int  # the original image size (the codec pads to its stride)
    width: int
    channels: int
    shapes: list[tuple[int, ...]]  # one latent shape per stream
    streams: list[bytes]
    latent_crc: int = 0  # CRC-32 of the integer latents the encoder coded (latent_crc)


def pack(p: Packed) -> bytes:
    head = _HEADER.pack(MAGIC, FORMAT_VERSION, p.model_id, p.height, p.width, p.channels,
                        p.latent_crc, len(p.streams))  # fmt: skip
    meta = b""
    for shape, stream in zip(p.shapes, p.streams, strict=True):
        meta += struct.pack("<B", len(shape)) + struct.pack(f"<{len(shape)}I", *shape)
        meta += struct.pack("<I", len(stream))
    body = b"".join(p.streams)
    crc = zlib.crc32(head + meta + body)
    return head + meta + struct.pack("<I", crc) + body


def unpack(data: bytes, name: str = "<bytes>") -> Packed:
    """Parse a codec file; a foreign, truncated or corrupted one is a DataError naming it."""
    if data[:4] != MAGIC:
        raise DataError(f"{name}: not a gm codec file (bad magic bytes)")
    if len(data) < _HEADER.size:
        raise DataError(f"{name}: truncated codec file ({len(data)} bytes, header cut short)")
    version = data[4]
    if version != FORMAT_VERSION:
        raise DataError(f"{name}: codec format version {version}; this gm reads {FORMAT_VERSION}")
    magic, version, model_id, h, w, c, crc_latents, n = _HEADER.unpack_from(data)
    pos, shapes, lengths = _HEADER.size, [], []
    try:
        for _ in range(n):
            (dims,) = struct.unpack_from("<B", data, pos)
            shapes.append(struct.unpack_from(f"<{dims}I", data, pos + 1))
            pos += 1 + 4 * dims
            (length,) = struct.unpack_from("<I", data, pos)
            lengths.append(length)
            pos += 4
        (crc,) = struct.unpack_from("<I", data, pos)
    except struct.error:
        raise DataError(f"{name}: truncated codec file (header cut short)") from None
    body = data[pos + 4 :]
    if len(body) != sum(lengths):
        raise DataError(
            f"{name}: truncated or padded codec file ({len(body)} bytes of streams, "
            f"the header says {sum(lengths)})"
        )
    if zlib.crc32(data[:pos] + body) != crc:
        raise DataError(f"{name}: corrupted codec file (CRC-32 mismatch)")
    streams, start = [], 0
    for length in lengths:
        streams.append(body[start : start + length])
        start += length
    return Packed(model_id, h, w, c, [tuple(s) for s in shapes], streams, crc_latents)


def header_bytes(p: Packed) -> int:
    """Bytes of a file that are not entropy-coded streams (header, shapes, CRC)."""
    return len(pack(p)) - sum(len(s) for s in p.streams)
