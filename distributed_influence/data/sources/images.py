"""Decoding encoded images (PNG, JPEG, GIF, BMP) into model-ready rows: TensorFlow's decoders
for whole blocks, Pillow image by image where a block needs resizing or has a bad image.

Shared by every format that stores images as files' bytes: Parquet image columns, TFRecord
features and image folders. An image is matched to the model's input:

* channels: converted to grey (``L``, ITU-R 601-2 luma) for a model taking one channel, to
  ``RGB`` for three, ``RGBA`` for four; for a model without a channel axis (H, W), grey;
* size: must equal the model's (H, W) unless ``resize`` is on, then bilinear resampling
  (Pillow) to it; a mismatch without ``resize`` is an error naming both sizes and the image;
* values: uint8 times ``scale`` (default 1/255) as float32, the same arithmetic as raw
  ``image`` bytes in Parquet, so a PNG gives exactly the rows of its raw pixels.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Callable, List, Optional, Sequence

import numpy as np

from distributed_influence.errors import SourceError

#: File name endings of images in a folder source (those Keras' image_dataset_from_directory takes).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
DEFAULT_SCALE = 1.0 / 255.0
#: Blocks of fewer images are decoded image by image with Pillow.
SMALL_BLOCK = 64


def looks_encoded(data: bytes) -> bool:
    """Whether bytes start like an image file rather than being raw pixels."""
    head = bytes(data[:12])
    if head.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a")):
        return True
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return True
    # BMP's two-letter signature is too short on its own: its header also holds the file size.
    return head.startswith(b"BM") and len(head) >= 6 and int.from_bytes(head[2:6], "little") == len(data)


@dataclasses.dataclass(frozen=True)
class Target:
    """What the model takes: height, width, channels (None = not fixed), and whether the model's
    input has no channel axis at all."""

    height: Optional[int] = None
    width: Optional[int] = None
    channels: Optional[int] = None
    no_channel_axis: bool = False


def target_of(input_shape: Optional[Sequence[Optional[int]]]) -> Target:
    """The image size and channels a model input asks for; an input that is not an image
    (flat rows, or unknown) fixes nothing, and the decoded pixels are reshaped to it later."""
    if input_shape is None:
        return Target()
    shape = tuple(input_shape)
    if len(shape) == 3 and shape[-1] in (1, 3, 4, None):
        return Target(shape[0], shape[1], shape[2])
    if len(shape) == 2:
        return Target(shape[0], shape[1], 1, no_channel_axis=True)
    return Target()


_GREY_MODES = ("1", "L", "LA", "I", "I;16", "F", "La")


def decode(data: bytes, target: Target, resize: bool, where: str) -> np.ndarray:
    """One encoded image as uint8 (H, W, C) — or (H, W) for a model without a channel axis.

    Raises:
        SourceError: the bytes are not a readable image, or its size differs from the
            model's and ``resize`` is off.
    """
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as exc:  # Pillow raises many types for bad data (OSError, SyntaxError, ...)
        raise SourceError(f"{where}: corrupt or unreadable image ({_reason(exc)})") from None
    channels = target.channels
    if channels is None:
        mode = "L" if img.mode in _GREY_MODES else ("RGBA" if img.mode in ("RGBA", "PA") else "RGB")
    else:
        mode = {1: "L", 3: "RGB", 4: "RGBA"}.get(channels)
        if mode is None:
            raise SourceError(f"{where}: the model takes {channels} channels; images have 1, 3 or 4")
    if img.mode != mode:
        img = img.convert(mode)
    want = (target.height, target.width)
    if None not in want and (img.height, img.width) != want:
        if not resize:
            raise SourceError(f"{where}: image is {img.height}x{img.width} but the model takes "
                              f"{want[0]}x{want[1]} (pass --resize to resize)")
        img = img.resize((want[1], want[0]), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2 and not target.no_channel_axis:
        arr = arr[..., None]
    return arr


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def decode_many(blobs: Sequence[bytes], where: Callable[[int], str], target: Target, resize: bool,
                scale: Optional[float]) -> np.ndarray:
    """Encoded images as one float32 block, scaled (default 1/255).

    The block is decoded by TensorFlow's image decoders in one graph call (no Python per
    image, so much faster than Pillow on small images), channels converted with Pillow's formulas.
    When that fails or does not fit (a corrupt image, mixed sizes, a size to resize), the
    block is decoded image by image with Pillow, which names the image at fault or resizes.

    Args:
        blobs: the encoded images, in row order.
        where: names row ``i`` of the block for messages (file, record or row).
        target: the model's image size and channels.
        resize: resize images whose size differs from the model's.
        scale: factor on the uint8 values (None = 1/255).

    Raises:
        SourceError: a corrupt image, or images of different sizes the model cannot take.
    """
    if not len(blobs):
        return np.zeros((0, 0), dtype=np.float32)
    # A few images (the driver's check of row 0, a report's pictures) are not worth building the
    # TensorFlow graph for (a fixed cost, paid once per process).
    block = _decode_block(blobs) if len(blobs) >= SMALL_BLOCK else None
    if block is not None and None not in (target.height, target.width) \
            and block.shape[1:3] != (target.height, target.width):
        block = None  # a size the model does not take: refused or resized image by image
    if block is None:
        arrays: List[np.ndarray] = [decode(b, target, resize, where(i)) for i, b in enumerate(blobs)]
        return stack_scaled(arrays, where, scale)
    block = convert_channels(block, target)
    scale = DEFAULT_SCALE if scale is None else scale
    return block.astype(np.float32) * np.float32(scale)


_DECODER = None


def _decode_block(blobs: Sequence[bytes]) -> Optional[np.ndarray]:
    """uint8 (n, H, W, C) in the images' own channels, or None if any image fails or sizes differ."""
    global _DECODER
    from distributed_influence.tfimport import import_tensorflow

    tf = import_tensorflow()
    if _DECODER is None:
        def one(b):
            return tf.io.decode_image(b, channels=0, dtype=tf.uint8, expand_animations=False)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)], autograph=False)
        def decode_all(data):
            return tf.map_fn(one, data, fn_output_signature=tf.TensorSpec([None, None, None], tf.uint8),
                             parallel_iterations=4)

        _DECODER = decode_all
    try:
        return _DECODER(tf.constant(list(blobs), dtype=tf.string)).numpy()
    except (tf.errors.OpError, ValueError):
        return None


def _luma(rgb: np.ndarray) -> np.ndarray:
    """Pillow's RGB → L conversion, bit for bit: (R·19595 + G·38470 + B·7471 + 2¹⁵) >> 16."""
    r, g, b = (rgb[..., i].astype(np.uint32) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)[..., None]


def convert_channels(block: np.ndarray, target: Target) -> np.ndarray:
    """uint8 (n, H, W, c) with c in 1..4 (L, LA, RGB, RGBA) to the target's channels, as
    Pillow's ``convert`` does; a target without a fixed channel count keeps L, RGB and RGBA."""
    c = block.shape[-1]
    want = target.channels
    if want is None:
        want = 1 if c <= 2 else c
    if c == want:
        out = block
    elif want == 1:
        out = block[..., :1] if c <= 2 else _luma(block)
    elif want in (3, 4):
        rgb = np.repeat(block[..., :1], 3, axis=-1) if c <= 2 else block[..., :3]
        if want == 3:
            out = rgb
        else:
            alpha = block[..., 1:2] if c == 2 else np.full(block.shape[:-1] + (1,), 255, np.uint8)
            out = np.concatenate([rgb, alpha], axis=-1)
    else:
        raise SourceError(f"the model takes {want} channels; images have 1, 3 or 4")
    if target.no_channel_axis:
        out = out[..., 0]
    return out


def stack_scaled(arrays: List[np.ndarray], where: Callable[[int], str], scale: Optional[float]) -> np.ndarray:
    """uint8 images of one size, stacked and scaled to float32; mixed sizes are refused."""
    if not arrays:
        return np.zeros((0, 0), dtype=np.float32)
    first = arrays[0].shape
    for i, a in enumerate(arrays):
        if a.shape != first:
            raise SourceError(f"{where(i)}: image of shape {a.shape} differs from {first} of "
                              f"{where(0)} (pass --resize to resize to the model's input)")
    block = np.stack(arrays)
    scale = DEFAULT_SCALE if scale is None else scale
    return block.astype(np.float32) * np.float32(scale)


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 (H, W), (H, W, 1) or (H, W, 3) as PNG bytes (for writing test data and examples)."""
    return _encode(pixels, "PNG")


def encode_jpeg(pixels: np.ndarray, quality: int = 95) -> bytes:
    """uint8 pixels as JPEG bytes."""
    return _encode(pixels, "JPEG", quality=quality)


def _encode(pixels: np.ndarray, fmt: str, **kw) -> bytes:
    from PIL import Image

    arr = np.asarray(pixels, dtype=np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()
