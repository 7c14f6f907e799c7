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
- **Files** (:func:`pack`, :func:`unpack`): a header (magic, format version, the model id, the
  image size, the latent shapes, stream lengths, a CRC-32) then the streams. A truncated,
  corrupted or foreign file, or one made by another model, is refused with a clear error.
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
FORMAT_VERSION = 1
SCALE_MIN, SCALE_MAX, SCALE_LEVELS = 0.11, 256.0, 64


def scale_table() -> torch.Tensor:
    """The Gaussian scales coding can use (CompressAI's choice: 64 levels from 0.11 to 256)."""
    return torch.exp(torch.linspace(math.log(SCALE_MIN), math.log(SCALE_MAX), SCALE_LEVELS))


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
        edges = torch.arange(-r, r + 2, dtype=torch.float32) - 0.5  # 2r + 2 bin edges
        cdf = torch.sigmoid(self.logits_cdf(edges.expand(c, 1, -1).contiguous()))[:, 0]
        cdf = cdf.double()
        cdf[:, 0], cdf[:, -1] = 0.0, 1.0
        self.pmf.copy_((cdf[:, 1:] - cdf[:, :-1]).clamp(min=1e-12))

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


def scale_indexes(scales: torch.Tensor) -> torch.Tensor:
    """Index of the table scale at or above each predicted scale."""
    table = scale_table().to(scales.dtype)
    return torch.bucketize(scales.clamp(SCALE_MIN, SCALE_MAX), table).clamp(max=SCALE_LEVELS - 1)


def encode_gaussian(q: torch.Tensor, scales: torch.Tensor, support: int) -> bytes:
    import constriction

    coder = constriction.stream.stack.AnsCoder()
    stds = scale_table().double()[scale_indexes(scales)].flatten().numpy()
    model = constriction.stream.model.QuantizedGaussian(-support, support)
    symbols = q.flatten().to(torch.int64).numpy().astype(np.int32)
    coder.encode_reverse(symbols, model, np.zeros_like(stds), stds)
    return coder.get_compressed().tobytes()


def decode_gaussian(data: bytes, scales: torch.Tensor, support: int) -> torch.Tensor:
    import constriction

    coder = constriction.stream.stack.AnsCoder(_words(data))
    stds = scale_table().double()[scale_indexes(scales)].flatten().numpy()
    model = constriction.stream.model.QuantizedGaussian(-support, support)
    values = coder.decode(model, np.zeros_like(stds), stds)
    return torch.from_numpy(values.astype(np.int64)).float().reshape(scales.shape)


def _words(data: bytes) -> np.ndarray:
    if len(data) % 4:
        raise DataError("a stream is not a whole number of 32-bit words")
    return np.frombuffer(data, dtype=np.uint32).copy()


# -- files ------------------------------------------------------------------------------------

_HEADER = struct.Struct("<4sB16sIIBB")  # magic, version, model id, height, width, channels, n


@dataclass
class Packed:
    model_id: bytes  # 16 bytes
    height: int  # the original image size (the codec pads to its stride)
    width: int
    channels: int
    shapes: list[tuple[int, ...]]  # one latent shape per stream
    streams: list[bytes]


def pack(p: Packed) -> bytes:
    head = _HEADER.pack(MAGIC, FORMAT_VERSION, p.model_id, p.height, p.width, p.channels,
                        len(p.streams))  # fmt: skip
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
    magic, version, model_id, h, w, c, n = _HEADER.unpack_from(data)
    if version != FORMAT_VERSION:
        raise DataError(f"{name}: codec format version {version}; this gm reads {FORMAT_VERSION}")
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
    return Packed(model_id, h, w, c, [tuple(s) for s in shapes], streams)


def header_bytes(p: Packed) -> int:
    """Bytes of a file that are not entropy-coded streams (header, shapes, CRC)."""
    return len(pack(p)) - sum(len(s) for s in p.streams)
