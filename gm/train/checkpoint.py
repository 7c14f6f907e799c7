"""Checkpoints: state dicts plus the config as JSON, loaded with ``weights_only=True``.

Never a pickled module: loading a checkpoint runs no code. A checkpoint names its model family,
its format version and the gm version that wrote it; loading checks them.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

import gm
from gm.config import from_dict, to_dict
from gm.errors import DataError
from gm.io import atomic_path
from gm.train.protocol import DataInfo

FORMAT_VERSION = 1


def save_checkpoint(
    path: str | os.PathLike,
    family: str,
    config: Any,
    info: DataInfo,
    trainer_state: dict,
    extra: dict | None = None,
) -> None:
    """Atomically write a checkpoint (the previous file stays valid if this one fails)."""
    payload = {
        "format_version": FORMAT_VERSION,
        "gm_version": gm.__version__,
        "family": family,
        "config": json.dumps(to_dict(config), sort_keys=True),
        "data_info": asdict(info),
        "trainer": trainer_state,
        "extra": extra or {},
    }
    # Serialized in memory first, so a failing write (a full disk: ENOSPC; a size limit: EFBIG)
    # is a plain OSError naming the file rather than an error deep in torch's zip writer. Then
    # written and fsynced to a temporary that replaces ``path`` only when complete.
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OSError(
            e.errno, f"{path}: checkpoint not written ({e.strerror}); the previous one is kept"
        ) from e


def load_checkpoint(path: str | os.PathLike, family: str | None = None) -> dict:
    """Read a checkpoint safely; a truncated, foreign or mismatched file is a DataError."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{path}: no such checkpoint") from None
    except (
        OSError,
        RuntimeError,
        EOFError,
        pickle.UnpicklingError,
        zipfile.BadZipFile,
        ValueError,
    ) as e:
        raise DataError(f"{path}: truncated or corrupt checkpoint ({e})") from None
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise DataError(f"{path}: not a gm checkpoint")
    if payload["format_version"] != FORMAT_VERSION:
        raise DataError(
            f"{path}: checkpoint format {payload['format_version']} written by gm "
            f"{payload.get('gm_version')}; this gm {gm.__version__} reads format {FORMAT_VERSION}"
        )
    if family is not None and payload["family"] != family:
        raise DataError(f"{path}: checkpoint of model {payload['family']!r}, not {family!r}")
    return payload


def build_from_checkpoint(payload: dict):
    """(model, config, info) rebuilt from a checkpoint's family, config and data info."""
    from gm.registry import families

    fams = families()
    name = payload["family"]
    if name not in fams:
        raise DataError(f"checkpoint of unknown model family {name!r}")
    fam = fams[name]
    cfg = from_dict(fam.config, json.loads(payload["config"]), name)
    info = DataInfo(**payload["data_info"])
    return fam.build(cfg, info), cfg, info


def trainer_from_checkpoint(payload: dict):
    """(Trainer, DataInfo) holding a checkpoint's weights, EMA copies and counters, for sampling
    and evaluation. The process's RNG state is left as it was (the checkpoint's is not applied).
    """
    from gm.train.loop import Trainer, rng_state, set_rng_state

    saved = rng_state()  # building the model draws initial weights; loading sets the RNG
    model, _, info = build_from_checkpoint(payload)
    # Any beta > 0 creates the EMA copies; their weights come from the checkpoint.
    trainer = Trainer(model, ema_beta=0.5 if payload["trainer"]["ema"] else 0.0)
    trainer.load_state_dict(payload["trainer"])
    set_rng_state(saved)
    return trainer, info
