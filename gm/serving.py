"""gm's MLflow model flavor: a generator or translator that `mlflow models serve` and
``mlflow.pyfunc.load_model`` can run, beside the exported graph gm itself loads.

MLflow's ``pytorch`` flavor saves gm's generators as exported programs (``pt2``: loading one
runs no pickled code) but gives them no ``python_function`` flavor, so ``mlflow models serve
-m models:/gm-cgan@champion`` failed ("No suitable flavor backend"). :func:`save_model` writes
the ``pytorch`` flavor as before and adds ``python_function`` with this module as its loader:
its ``predict`` takes the model's named input tensors and returns the images.

- a generator: ``{"z": (B, *latent) float32, "labels": (B,) int64}`` → (B, C, H, W) in [-1, 1]
  (``labels`` are ignored by an unconditional model but still given, as its signature says);
- a translator (SRGAN, pix2pix, CycleGAN): ``{"images": (B, C, h, w)}`` in [-1, 1] →
  (B, C, h·s, w·s).

Over HTTP (``mlflow models serve --env-manager local``, where gm is installed)::

    POST /invocations  {"inputs": {"z": [[...], ...], "labels": [3, 7]}}
    → {"predictions": [[[[...]]]]}

The serving environment must have gm installed (the loader is gm code, imported, not
unpickled): ``--env-manager local`` in gm's virtual environment.
"""

from __future__ import annotations

import os
from typing import Any

FLAVOR_LOADER = "gm.serving"


def save_model(path: str, pytorch_model, mlflow_model=None, **kwargs) -> None:
    """``mlflow.pytorch.save_model`` (exported graph, signature, metadata ...), then a
    ``python_function`` flavor served by :func:`_load_pyfunc`. For ``mlflow.models.Model.log``
    (``flavor=gm.serving``)."""
    import mlflow.pytorch
    from mlflow import pyfunc
    from mlflow.models import Model

    mlflow_model = mlflow_model or Model()
    kwargs.pop("validate_serving_input", None)  # Model.log's own option (gm.train.job)
    mlflow.pytorch.save_model(pytorch_model, path, mlflow_model=mlflow_model, **kwargs)
    pyfunc.add_to_model(
        mlflow_model,
        loader_module=FLAVOR_LOADER,
        data=mlflow_model.flavors["pytorch"]["model_data"],
        conda_env="conda.yaml",
        python_env="python_env.yaml",
    )
    mlflow_model.save(os.path.join(path, "MLmodel"))


class GmPyfunc:
    """``predict(inputs)``: the exported graph applied to the named input tensors."""

    def __init__(self, module, names: list[str]):
        self.module = module
        self.names = names  # the signature's input names, in the graph's argument order

    def predict(self, model_input: Any, params: dict[str, Any] | None = None):
        import numpy as np
        import torch

        if not isinstance(model_input, dict):  # one unnamed tensor (a translator's images)
            model_input = {self.names[0]: model_input}
        missing = [n for n in self.names if n not in model_input]
        if missing:
            raise ValueError(f"missing input(s) {missing}; the model takes {self.names}")
        args = []
        for n in self.names:
            a = np.asarray(model_input[n])
            args.append(torch.as_tensor(a, dtype=torch.long if n == "labels" else torch.float32))
        with torch.no_grad():
            return self.module(*args).float().cpu().numpy()


def _load_pyfunc(path: str, model_config: dict | None = None) -> GmPyfunc:
    """Called by ``mlflow.pyfunc.load_model`` with the model's ``data`` folder."""
    import mlflow.pytorch
    from mlflow.models import Model

    root = os.path.dirname(path)
    signature = Model.load(os.path.join(root, "MLmodel")).signature
    names = [spec.name for spec in signature.inputs.inputs] if signature else ["images"]
    return GmPyfunc(mlflow.pytorch.load_model(root), names)
