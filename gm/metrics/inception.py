"""Inception-v3 as the feature network of FID/KID/precision-recall and the Inception Score,
when its weights exist on this machine (``params.yaml: evaluate.inception_weights``).

Nothing is downloaded: the weights are a local file, in one of two formats, told apart by the
classifier's width:

- **FID Inception** (1008 classes): the TF graph ``pt_inception-2015-12-05`` of the original
  FID code (Heusel et al. 2017) as converted for PyTorch by pytorch-fid and torch-fidelity
  (``pt_inception-2015-12-05-6726825d.pth``, ``weights-inception-2015-12-05-6726825d.pth``),
  run by torch-fidelity's ``FeatureExtractorInceptionV3``. Images are quantized to 8 bits (as a
  saved PNG would be) and resized to 299×299 as clean-fid recommends (Parmar et al. 2022: PIL
  bicubic on each channel in floating point, antialiased), then fed as (x − 128) / 128. FIDs
  computed this way are comparable with published numbers on the same data and sample counts.
- **torchvision** ``inception_v3`` (1000 classes, e.g. ``inception_v3_google-0cc3c7bd.pth``,
  with or without the auxiliary classifier): images in [-1, 1] resized to 299×299 (bilinear,
  antialiased) and fed as they are. Comparable across gm runs, not with papers' FIDs.

Grey images are repeated to three channels. Features: the 2048-d global-average-pooled
``Mixed_7c``; logits: the ``fc`` layer (FID Inception: without its bias, torch-fidelity's
``logits_unbiased``, as its Inception Score uses).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gm.errors import ConfigError, DataError
from gm.io import sha256_file

SIZE = 299
RESIZE = f"bilinear-antialias ->{SIZE}"
CLEAN_RESIZE = f"clean-fid: 8-bit, PIL bicubic per channel ->{SIZE}"
FID_CLASSES = 1008  # the TF graph's classifier (1000 ImageNet classes and 8 unused)


def pool_features(net: nn.Module, x: torch.Tensor, pools: tuple[str, str, str]) -> torch.Tensor:
    """Inception-v3's 2048-d pooled ``Mixed_7c`` features of 299×299 inputs ``x``: the layers
    both formats share, with ``pools`` naming their two max-pools and the final average pool
    (torchvision and torch-fidelity name them differently)."""
    names = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", pools[0], "Conv2d_3b_1x1",
             "Conv2d_4a_3x3", pools[1], "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a",
             "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b",
             "Mixed_7c")  # fmt: skip
    for name in names:
        x = getattr(net, name)(x)
    return torch.flatten(getattr(net, pools[2])(x), 1)


class InceptionFeatures(nn.Module):
    """(B, C, H, W) images in [-1, 1] → 2048-d pool features; :meth:`head` gives the logits."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.num_features = 2048

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] != SIZE or x.shape[-2] != SIZE:
            x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True)
        return pool_features(self.net, x, ("maxpool1", "maxpool2", "avgpool"))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.net.fc(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class FidInceptionFeatures(nn.Module):
    """The FID Inception (torch-fidelity's ``FeatureExtractorInceptionV3``, weights from a local
    file): (B, C, H, W) images in [-1, 1] → 2048-d features, resized as clean-fid does."""

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.net = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
        )
        self.num_features = 2048

    @staticmethod
    def clean_resize(x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] → (B, C, 299, 299) float32 pixel values in [0, 255]:
        rounded to 8 bits, then each channel resized by PIL's bicubic filter in float mode
        (clean-fid's ``clean`` resize; identity at 299×299)."""
        import numpy as np
        from PIL import Image

        u8 = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
        out = np.empty((*u8.shape[:2], SIZE, SIZE), dtype=np.float32)
        for i, image in enumerate(u8):
            for c, plane in enumerate(image):
                pil = Image.fromarray(plane.astype(np.float32), mode="F")
                out[i, c] = np.asarray(pil.resize((SIZE, SIZE), Image.Resampling.BICUBIC))
        return torch.from_numpy(out)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.clean_resize(x.detach().cpu().float())
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = (x.to(next(self.net.parameters()).device) - 128) / 128
        return pool_features(self.net, x, ("MaxPool_1", "MaxPool_2", "AvgPool"))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.net.fc.weight.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_inception(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """(network in eval mode, description: kind, path, sha256, resize) from a local weights
    file: the FID Inception when its classifier has 1008 classes, else torchvision's. A missing
    file is a ConfigError; a file that is not an Inception-v3 state dict (or holds anything but
    tensors) a DataError naming it."""
    from torchvision.models import inception_v3

    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"evaluate.inception_weights: {path} does not exist (Inception-v3 weights are never "
            "downloaded; put the FID Inception (pt_inception-2015-12-05) or torchvision's "
            "inception_v3 state dict there, or set it to '')"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, pickled objects, not a torch file
        raise DataError(f"{path}: not a readable Inception-v3 state dict ({e})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or "Mixed_7c.branch_pool.conv.weight" not in state:
        raise DataError(f"{path}: not torchvision's inception_v3 state-dict format")
    aux = any(k.startswith("AuxLogits.") for k in state)
    classes = state["fc.weight"].shape[0] if "fc.weight" in state else 1000
    if classes == FID_CLASSES and not aux:
        # loaded with weights_only above: the file holds tensors only, so torch-fidelity's own
        # (unrestricted) torch.load of it runs no pickled code
        try:
            net = FidInceptionFeatures(path)
        except RuntimeError as e:
            first = str(e).splitlines()[0:2]
            msg = f"{path}: weights do not fit the FID Inception ({' '.join(first)})"
            raise DataError(msg) from None
        desc = {"kind": "fid-inception-2015-12-05", "path": str(path),
                "sha256": sha256_file(path), "resize": CLEAN_RESIZE}  # fmt: skip
        return net.eval(), desc
    net = inception_v3(
        weights=None, aux_logits=aux, init_weights=False, num_classes=classes, transform_input=False
    )
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[0:2]
        raise DataError(f"{path}: weights do not fit Inception-v3 ({' '.join(first)})") from None
    desc = {"kind": "inception-v3", "path": str(path), "sha256": sha256_file(path),
            "resize": RESIZE}  # fmt: skip
    return InceptionFeatures(net).eval(), desc
