"""Apply a trained paired model to a user's images: ``gm upscale`` and ``gm translate``.

A model is a gm checkpoint (``models/srgan/checkpoint.pt``) or an MLflow model URI
(``runs:/<run id>/generator``, ``models:/<name>/<version>``). Images of any size are processed
in overlapping tiles of the model's training input size (an exported MLflow model has that
input shape; a checkpoint's network would take any size, and tiles bound its memory): each tile
contributes only its centre, so tile borders leave no seams. A file that cannot be read or
processed is reported and the rest are still processed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from gm.errors import DataError
from gm.tracking import is_model_uri, model_info


@dataclass
class Translator:
    fn: Callable[[torch.Tensor], torch.Tensor]  # (B, C, t, t) in [-1, 1] → (B, C, t·s, t·s)
    scale: int  # output side / input side
    tile: int  # input tile side the model takes
    channels: int  # 1 (grey) or 3 (RGB)
    kind: str  # super_resolution | translation
    name: str  # what was loaded, for messages


def load_translator(ref: str, kind: str, reverse: bool = False) -> Translator:
    """A checkpoint path or an MLflow model URI → a :class:`Translator` of pairs ``kind``."""
    if is_model_uri(ref):
        return _from_mlflow(ref, kind, reverse)
    return _from_checkpoint(Path(ref), kind, reverse)


def _from_checkpoint(path: Path, kind: str, reverse: bool) -> Translator:
    from gm.registry import families
    from gm.train.checkpoint import load_checkpoint, trainer_from_checkpoint

    payload = load_checkpoint(path)
    family = payload["family"]
    fams = families()
    if family not in fams or fams[family].pairs != kind:
        wanted = ", ".join(n for n, f in fams.items() if f.pairs == kind)
        raise DataError(f"{path}: a {family} checkpoint; this command needs one of: {wanted}")
    trainer, info = trainer_from_checkpoint(payload)
    model = trainer.model.eval()
    if reverse and not model.two_way:
        raise DataError(f"{path}: {family} translates one way only (no --reverse)")
    src = model.pair_source()
    nets = trainer.sampling_nets()
    return Translator(
        fn=lambda x: model.translate(x, nets, reverse),
        scale=src.scale,
        tile=info.resolution // src.scale,
        channels=info.channels,
        kind=kind,
        name=f"{path} ({family}, step {payload['trainer']['step']})",
    )


def _from_mlflow(uri: str, kind: str, reverse: bool) -> Translator:
    import mlflow.pytorch

    if reverse:
        raise DataError(f"{uri}: --reverse picks a checkpoint's second generator; for an MLflow "
                        "model use the URI of the other direction (…/generator_ba)")  # fmt: skip
    meta = model_info(uri).metadata or {}
    if "input_resolution" not in meta:
        raise DataError(f"{uri}: not a gm paired model (no input_resolution in its metadata)")
    scale = int(meta["scale"])
    if (kind == "super_resolution") != (scale > 1):
        raise DataError(f"{uri}: a ×{scale} {meta.get('family')} model, not a {kind} model")
    module = mlflow.pytorch.load_model(uri)
    return Translator(
        fn=lambda x: module(x),
        scale=scale,
        tile=int(meta["input_resolution"]),
        channels=int(meta["data_info"]["channels"]),
        kind=kind,
        name=f"{uri} ({meta.get('family')})",
    )


@torch.no_grad()
def apply_tiled(t: Translator, image: torch.Tensor, overlap: int = 0, batch: int = 16):
    """(C, H, W) in [-1, 1] → (C, H·s, W·s): tiles of ``t.tile`` input pixels whose centres
    (all but ``overlap`` pixels on each side; default a quarter of the tile) tile the image."""
    c, h, w = image.shape
    tile = t.tile
    m = overlap if overlap else tile // 4
    step = tile - 2 * m
    if step <= 0:
        raise ValueError(f"overlap {m} leaves nothing of a {tile}-pixel tile")
    rows, cols = math.ceil(h / step), math.ceil(w / step)
    pad = (m, cols * step - w + m, m, rows * step - h + m)  # left, right, top, bottom
    padded = F.pad(image[None], pad, mode="replicate")[0]
    s = t.scale
    out = torch.empty(c, rows * step * s, cols * step * s)
    spots = [(i, j) for i in range(rows) for j in range(cols)]
    for k in range(0, len(spots), batch):
        chunk = spots[k : k + batch]
        x = torch.stack([padded[:, i * step : i * step + tile, j * step : j * step + tile]
                         for i, j in chunk])  # fmt: skip
        y = t.fn(x).float().cpu()  # (b, C, tile·s, tile·s)
        core = y[:, :, m * s : (m + step) * s, m * s : (m + step) * s]
        for (i, j), patch in zip(chunk, core, strict=True):
            out[:, i * step * s : (i + 1) * step * s, j * step * s : (j + 1) * step * s] = patch
    return out[:, : h * s, : w * s].clamp(-1, 1)


def read_image(path: Path, channels: int) -> torch.Tensor:
    """An image file → (C, H, W) in [-1, 1], decoded under the datasets' colour policy
    (gm.data.images: EXIF orientation, alpha onto white, 16-bit, CMYK ...)."""
    from gm.data.images import BadImage, decode
    from gm.data.readers import to_unit_range

    try:
        pixels = decode(str(path), channels, background=(255,) * channels)
    except BadImage as e:
        raise DataError(f"{path}: {e.reason}") from None
    return to_unit_range(pixels[None])[0]


def write_image(path: Path, image: torch.Tensor) -> None:
    from PIL import Image

    from gm.io import atomic_path

    a = ((image + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(tmp, format="PNG")


def plan(src: Path, out: Path) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """(input, output) pairs: a file → ``out`` (or ``out/<name>.png`` when ``out`` is a
    folder); a folder → the same relative paths under ``out`` as PNG. Also the files skipped
    for not having an image suffix."""
    if not src.exists():
        raise DataError(f"{src}: no such file or folder")
    if src.is_file():
        dest = out / f"{src.stem}.png" if out.is_dir() else out
        return [(src, dest)], []
    from gm.data.prepare import IMAGE_SUFFIXES

    jobs, skipped = [], []
    for p in sorted(q for q in src.rglob("*") if q.is_file()):
        rel = p.relative_to(src)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.suffix.lower() in IMAGE_SUFFIXES:
            jobs.append((p, (out / rel).with_suffix(".png")))
        else:
            skipped.append(p)
    if not jobs:
        raise DataError(f"{src}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return jobs, skipped


def run(
    t: Translator, src: Path, out: Path, progress: bool = True
) -> tuple[list[Path], list[tuple[Path, str]], list[Path]]:
    """Process every image of ``src``; returns (written, failed with reasons, skipped)."""
    from tqdm import tqdm

    jobs, skipped = plan(src, out)
    written, failed = [], []
    for inp, dest in tqdm(jobs, desc=t.kind.replace("_", " "), unit="img", disable=not progress):
        try:
            image = read_image(inp, t.channels)
            write_image(dest, apply_tiled(t, image))
            written.append(dest)
        except (DataError, OSError, RuntimeError, ValueError) as e:
            failed.append((inp, str(e).removeprefix(f"{inp}: ")))
    return written, failed, skipped


def main_for(kind: str, args) -> int:
    """The body of ``gm upscale`` / ``gm translate``: exit 0, or 2 when any file failed."""
    import sys

    t = load_translator(args.model, kind, getattr(args, "reverse", False))
    src, out = Path(args.input), Path(args.out)
    if src.is_dir() and out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder (the input is a folder)")
    written, failed, skipped = run(t, src, out, progress=not args.quiet)
    print(f"{t.name}: {len(written)} image(s) written to {out}")
    for p in skipped:
        print(f"skipped {p}: not an image file suffix", file=sys.stderr)
    if failed:
        print(
            f"error: {len(failed)} of {len(failed) + len(written)} image(s) failed:",
            file=sys.stderr,
        )
        for p, why in failed:
            print(f"  {p}: {why}", file=sys.stderr)
        return 2
    return 0
