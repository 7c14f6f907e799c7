"""Inception-v3 as the feature network of FID/KID/precision-recall and the Inception Score,
when its weights exist on this machine (``params.yaml: evaluate.inception_weights``).

Nothing is downloaded: the weights are a local file in torchvision's ``inception_v3`` state-dict
format (e.g. ``inception_v3_google-0cc3c7bd.pth``, with or without the auxiliary classifier).
Images in [-1, 1] (grey images repeated to three channels) are resized to 299×299 (bilinear,
antialiased) and fed as they are: the Google weights expect [-1, 1] inputs, which is what
torchvision's ``transform_input`` produces from ImageNet-normalized ones. Features: the 2048-d
global-average-pooled ``Mixed_7c``; logits: the 1000-way ``fc``.

These are torchvision's Inception weights, not the TF graph of the original FID code
(``pt_inception-2015-12-05``): numbers are comparable across gm runs, not to papers' FIDs.
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
        n = self.net
        for layer in (
            n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, n.maxpool1,
            n.Conv2d_3b_1x1, n.Conv2d_4a_3x3, n.maxpool2,
            n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a, n.Mixed_6b, n.Mixed_6c,
            n.Mixed_6d, n.Mixed_6e, n.Mixed_7a, n.Mixed_7b, n.Mixed_7c,
        ):  # fmt: skip
            x = layer(x)
        return torch.flatten(n.avgpool(x), 1)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.net.fc(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_inception(path: str | os.PathLike) -> tuple[InceptionFeatures, dict]:
    """(network in eval mode, description: kind, path, sha256) from a local weights file."""
    from torchvision.models import inception_v3

    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"evaluate.inception_weights: {path} does not exist (Inception-v3 weights are never "
            "downloaded; put torchvision's inception_v3 state dict there, or set it to '')"
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
    net = inception_v3(
        weights=None, aux_logits=aux, init_weights=False, num_classes=classes, transform_input=False
    )
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[0:2]
        raise DataError(f"{path}: weights do not fit Inception-v3 ({' '.join(first)})") from None
    desc = {"kind": "inception-v3", "path": str(path), "sha256": sha256_file(path)}
    return InceptionFeatures(net).eval(), desc
