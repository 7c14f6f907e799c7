"""What the paired families (SRGAN, pix2pix, CycleGAN) share: the base class, the PatchGAN
discriminator (Isola et al. 2017) and the history buffer of generated images (Shrivastava et
al. 2017, as CycleGAN uses it)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from gm.train.protocol import GANPair


class Clamped(nn.Module):
    """``x → clamp(net(x), -1, 1)``: what gets exported, so outputs are always valid images."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).clamp(-1, 1)


class PairedGAN(GANPair):
    """A paired family with one translating generator ``G`` (x → y) and a discriminator ``D``.
    Generation needs an input image: :meth:`translate`, not :meth:`sample`."""

    def translators(self, nets: Mapping[str, nn.Module] | None = None) -> dict[str, nn.Module]:
        return {"generator": Clamped((nets or {}).get("G", self.G))}

    @property
    def two_way(self) -> bool:
        """Translates both ways: a second translator, ``translate(x, reverse=True)``."""
        return len(self.translators()) == 2

    @torch.no_grad()
    def translate(self, x, nets=None, reverse=False):
        """The first translator (x → y), or with ``reverse`` the second (y → x)."""
        translators = list(self.translators(nets).values())
        if reverse and len(translators) < 2:
            raise ValueError(f"{type(self).__name__} translates one way only")
        return translators[int(reverse)](x.to(self.device()))

    def device(self) -> torch.device:
        return next(self.parameters()).device

    def sample(self, n, labels=None, generator=None, nets=None):
        raise TypeError(f"{type(self).__name__} translates input images: use translate(x)")

    def latent_shape(self):
        raise TypeError(f"{type(self).__name__} has no latent input: it translates images")

    def generator(self, nets=None):
        return self.translators(nets)["generator"]


class PatchGAN(nn.Module):
    """The 70×70 PatchGAN discriminator (``layers=3``): C64-C128-C256 (stride 2), C512
    (stride 1), then a 1-channel map of real/fake logits, one per overlapping patch. 4×4
    convs, LeakyReLU(0.2), no normalization on the first layer."""

    def __init__(
        self,
        channels: int,  # input channels (pix2pix: input and output concatenated)
        ndf: int = 64,  # channels of the first layer; doubled per layer up to 8·ndf
        layers: int = 3,  # stride-2 layers: 3 → 70×70 receptive field, 1 → 16×16 ...
        norm: str = "batch",  # batch (pix2pix) or instance (CycleGAN)
    ):
        super().__init__()
        Norm = {"batch": nn.BatchNorm2d, "instance": nn.InstanceNorm2d}[norm]
        seq: list[nn.Module] = [nn.Conv2d(channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        ch = ndf
        for i in range(1, layers + 1):
            out = ndf * min(2**i, 8)
            stride = 2 if i < layers else 1
            seq += [
                nn.Conv2d(ch, out, 4, stride, 1, bias=False),
                Norm(out),
                nn.LeakyReLU(0.2, True),
            ]
            ch = out
        seq.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*seq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (b, 1, h', w') patch logits


def receptive_field(layers: int) -> int:
    """Receptive field in pixels of a PatchGAN output (``layers=3`` → 70)."""
    field = 1
    for kernel, stride in reversed([(4, 2)] * layers + [(4, 1), (4, 1)]):
        field = field * stride + (kernel - stride)
    return field


class ImagePool(nn.Module):
    """History of up to ``size`` generated images for the discriminator: once full, each new
    image is returned as is with probability ½, else swapped for a random stored one (which the
    new image replaces). Keeps D from forgetting what G produced earlier. The buffer is module
    state: it is checkpointed, so a resumed run continues with the same history."""

    def __init__(self, size: int, shape: tuple[int, ...]):
        super().__init__()
        self.size = size
        self.register_buffer("images", torch.zeros(size, *shape))  # (size, C, H, W)
        self.register_buffer("count", torch.zeros((), dtype=torch.long))  # stored so far

    @torch.no_grad()
    def query(self, images: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return images
        out = []
        for img in images:
            n = int(self.count)
            if n < self.size:  # filling: store and return the new image
                self.images[n] = img
                self.count += 1
                out.append(img)
            elif float(torch.rand(())) < 0.5:  # swap for a stored one
                i = int(torch.randint(0, self.size, ()))
                out.append(self.images[i].clone())
                self.images[i] = img
            else:
                out.append(img)
        return torch.stack(out)
