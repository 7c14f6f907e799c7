"""``gm compress`` / ``gm decompress``: an image to a learned-codec file and back.

The codec is a trained ``codec`` checkpoint. Images are read with the datasets' decoder
(gm.data.images: EXIF orientation, alpha onto white, 16-bit, CMYK ...), coded at any size
(padded to the model's stride, cropped back on decoding) and written atomically.
"""

from __future__ import annotations

from pathlib import Path

from gm.errors import DataError


def load_codec(checkpoint: str | Path):
    """The Codec model of a ``codec`` checkpoint (its EMA weights when kept), frozen."""
    from gm.train.checkpoint import load_checkpoint, trainer_from_checkpoint

    path = Path(checkpoint)
    payload = load_checkpoint(path)
    if payload["family"] != "codec":
        raise DataError(f"{path}: a {payload['family']} checkpoint, not a learned codec (codec)")
    trainer, _ = trainer_from_checkpoint(payload)
    model = trainer.model.cpu().eval()
    model.freeze(recompute_tables=False)  # the checkpoint's tables, wherever it is decoded
    return model


def compress_file(src: Path, dst: Path, model) -> dict[str, float]:
    from gm import codec as coding
    from gm.apply import read_image
    from gm.io import atomic_path

    image = (read_image(src, model.info.channels) + 1) / 2
    packed = model.compress(image)
    data = coding.pack(packed)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:
        tmp.write_bytes(data)
    pixels = image.shape[1] * image.shape[2]
    return {"bytes": len(data), "bpp": 8 * len(data) / pixels,
            "header_bytes": coding.header_bytes(packed),
            "ratio": 24 * pixels / (8 * len(data))}  # fmt: skip


def decompress_file(src: Path, dst: Path, model) -> None:
    from gm import codec as coding
    from gm.apply import write_image

    try:
        data = src.read_bytes()
    except OSError as e:
        raise DataError(f"{src}: cannot read ({e.strerror})") from None
    packed = coding.unpack(data, str(src))
    if packed.channels != model.info.channels:
        raise DataError(f"{src}: {packed.channels} channels; the model codes "
                        f"{model.info.channels}")  # fmt: skip
    image = model.decompress(packed, str(src))
    write_image(dst, image * 2 - 1)


def main_compress(args) -> int:
    model = load_codec(args.model)
    s = compress_file(Path(args.input), Path(args.output), model)
    print(f"{args.input} → {args.output}: {s['bytes']} bytes, {s['bpp']:.3f} bpp "
          f"(header {s['header_bytes']} bytes), {s['ratio']:.1f}:1 against 24-bit RGB")  # fmt: skip
    return 0


def main_decompress(args) -> int:
    model = load_codec(args.model)
    decompress_file(Path(args.input), Path(args.output), model)
    print(f"{args.input} → {args.output}")
    return 0
