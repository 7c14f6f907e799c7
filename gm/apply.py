"""Apply a trained paired model to a user's images: ``gm upscale`` and ``gm translate``.

A model is a gm checkpoint (``models/srgan/checkpoint.pt``) or an MLflow model URI
(``runs:/<run id>/generator``, ``models:/<name>/<version>``). Images of any size are processed
in overlapping windows that bound memory, and the result equals one pass over the whole image
(to float rounding): each window keeps only the output pixels whose whole receptive field lies
inside it or at a real image border. The receptive field is computed from the network itself
(:func:`receptive_radius`, by autograd), as is its alignment (:func:`alignment`, the product of
its strides), never hand-kept. A network whose every output depends on the whole image
(CycleGAN's instance normalization) is run on the whole image at once. An exported MLflow model
carries its receptive field in its metadata; one whose graph was specialized to its training
input size (pix2pix's U-Net) is tiled at that size, exactly where its field allows. A file that
cannot be read or processed is reported and the rest are still processed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gm.errors import DataError
from gm.tracking import is_model_uri, model_info


@dataclass
class Translator:
    fn: Callable[[torch.Tensor], torch.Tensor]  # (B, C, h, w) in [-1, 1] → (B, C, h·s, w·s)
    scale: int  # output side / input side
    tile: int  # the model's training input side
    channels: int  # 1 (grey) or 3 (RGB)
    kind: str  # super_resolution | translation
    name: str  # what was loaded, for messages
    radius: int | None = None  # input pixels an output pixel sees on each side; None: all
    align: int = 1  # window offsets and sides are multiples of this (the network's stride)
    fixed: bool = False  # takes only tile x tile inputs (an exported graph)
    note: str = ""  # said once to the user (e.g. why tiles cannot be exact)


def alignment(module: nn.Module) -> int:
    """The input alignment a network needs to be shift-equivariant: the product of the strides
    of its strided convolutions and poolings (2^depth for a U-Net, 4 for CycleGAN's ResNet
    generator, 1 for SRResNet). Transposed convolutions and pixel shuffles upsample: they add
    no constraint."""
    out = 1
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d):
            stride = m.stride if isinstance(m.stride, tuple) else (m.stride, m.stride)
            out *= max(stride)
    return out


def receptive_radius(
    fn: Callable[[torch.Tensor], torch.Tensor],
    channels: int,
    scale: int,
    align: int = 1,
    start: int = 32,
    limit: int = 512,
) -> int | None:
    """How many input pixels on each side of an input pixel can influence the output pixels it
    maps to, measured with autograd: the gradient of an output block at the centre of a
    (1, channels, n, n) input is nonzero over its receptive field. A module is measured on a
    copy whose every path is open (:func:`_every_path_open`), so the result is the
    architecture's field, valid for any weights (a zero-initialized layer or a ReLU closed for
    one input would otherwise hide pixels that trained weights use). The probe grows
    (``start`` to ``limit`` pixels, multiples of ``align``) until the field stops short of its
    border; None when it still reaches the border at ``limit`` (the output depends on the
    whole image, as with instance normalization). ``fn`` must be differentiable (a final
    clamp would hide gradients)."""
    if isinstance(fn, nn.Module):
        if _normalizes_over_the_image(fn):
            return None
        fn = _every_path_open(fn)
    g = torch.Generator().manual_seed(0)
    n = -(-start // align) * align
    while n <= limit:
        x = torch.rand(1, channels, n, n, generator=g, dtype=torch.float64)
        if not isinstance(fn, nn.Module):
            x = x.float()
        x.requires_grad_(True)
        c = n // 2 // align * align  # the centre, on the alignment grid
        with torch.enable_grad():
            y = fn(x)
            y[:, :, c * scale : (c + 1) * scale, c * scale : (c + 1) * scale].sum().backward()
        seen = (x.grad.abs().sum((0, 1)) > 0).cpu()
        if not seen.any():  # nothing measurable: the whole image, which is always exact
            return None
        rows, cols = seen.any(1).nonzero().flatten(), seen.any(0).nonzero().flatten()
        lo, hi = min(rows.min(), cols.min()).item(), max(rows.max(), cols.max()).item()
        if lo > 0 and hi < n - 1:
            return max(c - lo, hi - c)
        n *= 2
    return None


def _normalizes_over_the_image(net: nn.Module) -> bool:
    """Whether some layer mixes statistics of the whole image into every output pixel:
    instance normalization without running statistics (CycleGAN), group normalization,
    attention."""
    glob = (nn.GroupNorm, nn.MultiheadAttention)
    return any(
        isinstance(m, glob)
        or isinstance(m, nn.modules.instancenorm._InstanceNorm)
        and not m.track_running_stats
        for m in net.modules()
    )


def _every_path_open(net: nn.Module) -> nn.Module:
    """A float64 CPU copy of ``net`` in eval mode whose weights are positive and average their
    inputs (1 / fan-in), biases small and positive, batch-norm statistics neutral: fed a
    positive input, no ReLU closes, no weight is zero and nothing saturates, so every
    connection of the architecture carries gradient."""
    import copy

    probe = copy.deepcopy(net).double().cpu().eval()
    with torch.no_grad():
        for p in probe.parameters():
            p.fill_(1.0 / p[0].numel() if p.dim() > 1 else 0.01)
        for m in probe.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
    return probe


def _windows(length: int, window: int, margin: int) -> list[tuple[int, int, int]]:
    """(start, keep from, keep to) along one axis of ``length`` pixels: windows of ``window``
    pixels whose kept parts lie at least ``margin`` pixels from any window edge that is not an
    image edge, and together cover the axis. Starts are multiples of the alignment when
    ``window``, ``margin`` and ``length`` are (the last window ends at the image edge)."""
    if length <= window:
        return [(0, 0, length)]
    starts = [0]
    while starts[-1] + window < length:
        starts.append(min(starts[-1] + window - 2 * margin, length - window))
    out = []
    for p in starts:
        keep_from = p + margin if p > 0 else 0
        keep_to = p + window - margin if p + window < length else length
        out.append((p, keep_from, keep_to))
    return out


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
    module = list(model.translators(trainer.sampling_nets()).values())[int(reverse)].eval()
    tile = info.resolution // src.scale
    align, radius = tiling(module, info.channels, src.scale, tile)
    return Translator(
        fn=module,
        scale=src.scale,
        tile=tile,
        channels=info.channels,
        kind=kind,
        name=f"{path} ({family}, step {payload['trainer']['step']})",
        radius=radius,
        align=align,
    )


def tiling(module: nn.Module, channels: int, scale: int, tile: int) -> tuple[int, int | None]:
    """(alignment, receptive radius in input pixels or None) of a translator module (gm's
    ``Clamped`` wrapper is looked through: its clamp would zero gradients)."""
    net = getattr(module, "net", module)
    align = alignment(net)
    return align, receptive_radius(net, channels, scale, align, start=max(32, tile))


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
    tile = int(meta["input_resolution"])
    note = ""
    if "receptive_radius" in meta:  # logged by gm.train.job.log_models
        radius = int(meta["receptive_radius"])
        radius, align = (radius if radius >= 0 else None), int(meta["alignment"])
    else:
        radius, align = tile // 4, 1
        note = (
            f"{uri}: logged without its receptive field (an older gm): tiles overlap by "
            f"{radius} pixels and may differ from a whole-image pass at their borders"
        )
    fixed = not _takes_other_sizes(module, int(meta["data_info"]["channels"]), tile, align)
    if fixed and (radius is None or 2 * radius + align > tile):
        what = "depends on the whole image" if radius is None else f"sees {radius} pixels"
        note = (f"{uri}: the exported graph takes only {tile}x{tile} inputs and each output "
                f"pixel {what}: tiled output can differ from one whole-image pass; a checkpoint "
                "(models/<job>/checkpoint.pt) gives the exact result")  # fmt: skip
        radius = max(0, (tile - align) // 2 // align * align)
    return Translator(
        fn=lambda x: module(x),
        scale=scale,
        tile=tile,
        channels=int(meta["data_info"]["channels"]),
        kind=kind,
        name=f"{uri} ({meta.get('family')})",
        radius=radius,
        align=align,
        fixed=fixed,
        note=note,
    )


def _takes_other_sizes(module, channels: int, tile: int, align: int) -> bool:
    """Whether an exported graph runs on an input other than its training size (its height
    and width were exported as dynamic), tried once on a small zero input."""
    side = -(-(tile + 1) // align) * align
    try:
        with torch.no_grad():
            module(torch.zeros(1, channels, side, side + align))
    except Exception:  # noqa: BLE001 - a shape guard of the exported graph, whatever its type
        return False
    return True


@torch.no_grad()
def apply_tiled(t: Translator, image: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """(C, H, W) in [-1, 1] → (C, H·s, W·s), equal to ``t.fn`` on the whole image (padded at its
    right and bottom to the alignment by replication) to float rounding.

    Windows are ``t.tile`` pixels for a fixed-size model, else the larger of the tile and four
    receptive radii; each keeps the output pixels at least a radius (rounded up to the
    alignment) from every window edge inside the image. With ``t.radius`` None the whole image
    is one window."""
    c, h, w = image.shape
    a, s = t.align, t.scale
    hp, wp = -(-h // a) * a, -(-w // a) * a
    if t.fixed:
        hp, wp = max(hp, t.tile), max(wp, t.tile)
    padded = F.pad(image[None], (0, wp - w, 0, hp - h), mode="replicate")[0]
    margin = -(-(t.radius or 0) // a) * a
    window = t.tile if t.fixed else -(-max(t.tile, 4 * margin, 2 * margin + a) // a) * a
    if not t.fixed and (t.radius is None or max(hp, wp) <= window):  # one whole-image pass
        return _run(t, padded[None])[0][:, : h * s, : w * s].clamp(-1, 1)
    rows, cols = _windows(hp, window, margin), _windows(wp, window, margin)
    wh, ww = min(window, hp), min(window, wp)
    out = torch.empty(c, hp * s, wp * s)
    spots = [(r, q) for r in rows for q in cols]
    for k in range(0, len(spots), batch):
        chunk = spots[k : k + batch]
        x = torch.stack([padded[:, r[0] : r[0] + wh, q[0] : q[0] + ww] for r, q in chunk])
        y = _run(t, x)  # (b, C, wh·s, ww·s)
        for ((r0, r1, r2), (q0, q1, q2)), patch in zip(chunk, y, strict=True):
            keep = patch[:, (r1 - r0) * s : (r2 - r0) * s, (q1 - q0) * s : (q2 - q0) * s]
            out[:, r1 * s : r2 * s, q1 * s : q2 * s] = keep
    return out[:, : h * s, : w * s].clamp(-1, 1)


def _run(t: Translator, x: torch.Tensor) -> torch.Tensor:
    param = next(iter(getattr(t.fn, "parameters", list)()), None)
    if param is not None:
        x = x.to(param.device)
    return t.fn(x).float().cpu()


def read_image(path: Path, channels: int) -> torch.Tensor:
    """An image file → (C, H, W) in [-1, 1], decoded under the datasets' colour policy
    (gm.data.images: EXIF orientation, alpha onto white, 16-bit, CMYK ...)."""
    from gm.data.images import BadImage, decode
    from gm.data.readers import to_unit_range

    try:
        pixels = decode(str(path), channels, background=(255,) * channels)
    except BadImage as e:
        raise DataError(f"{path}: {e.reason}") from None
    return to_unit_range(pixels[None].copy())[0]  # a writable copy for torch


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
    if t.note:
        print(f"note: {t.note}", file=sys.stderr)
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
