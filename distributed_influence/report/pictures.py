"""Pictures for the report: training and test examples read back from the audit's sources.

The report shows examples as pictures when its sources hold images (H×W, H×W×1 or H×W×3)
and falls back to ids and values otherwise, or when a source can no longer be opened, so a
report never fails because the data moved. Thumbnails are written as small PNG files with
Pillow (a Matplotlib dependency), at the example's own size: the page scales them up.

The page's figures share :func:`new_figure` and :func:`save_figure`: Matplotlib's object API on
the Agg canvas, so nothing needs a display and no global pyplot state is touched.
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

#: Resolution of the page's figures.
FIGURE_DPI = 100


def as_picture(x: np.ndarray) -> Optional[np.ndarray]:
    """The example as a drawable (H, W) or (H, W, 3) array, or None if it is not an image.

    An example is image-like when it is (H, W), (H, W, 1) or (H, W, 3) with H, W >= 4; colour
    values outside [0, 1] are rescaled, because ``imshow`` clips RGB floats to that range.
    """
    if x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim not in (2, 3) or min(x.shape[:2]) < 4 or (x.ndim == 3 and x.shape[-1] != 3):
        return None
    if x.ndim == 3 and (x.min() < 0 or x.max() > 1):
        span = float(x.max() - x.min())
        x = (x - x.min()) / (span if span > 0 else 1.0)
    return x


def read_pictures(source, input_shape: Optional[Sequence[int]], ids: np.ndarray) -> Dict[int, np.ndarray]:
    """The examples of the given ids as pictures (None where not an image), reading only their rows."""
    all_ids = source.ids()
    rows = np.flatnonzero(np.isin(all_ids, ids))
    return {int(all_ids[r]): as_picture(source.read(int(r), int(r) + 1, input_shape).x[0]) for r in rows}


def _shape(config: dict):
    shape = config.get("input_shape")
    return None if shape is None else tuple(shape)


def load_role_pictures(config: dict, role: str,
                       ids: np.ndarray) -> Tuple[Optional[Dict[int, np.ndarray]], Optional[str]]:
    """Pictures of the given ids of one source (``train`` or ``test``) named in the manifest.

    Returns:
        ({id: picture}, None) when the source holds images, else (None, a note saying why the
        page shows ids and values instead).
    """
    from distributed_influence.data.sources import open_source, options_from

    spec = config.get(role)
    try:
        pictures = read_pictures(open_source(str(spec), **options_from(config)), _shape(config), ids)
    except Exception as exc:  # pictures are optional: whatever stops them must not stop the report
        return None, f"The {role} source {spec} cannot be read ({exc}); showing ids and values."
    if any(p is None for p in pictures.values()):
        return None, f"The {role} source {spec} does not hold images; showing ids and values."
    return pictures, None


def load_pictures(config: dict, train_ids: np.ndarray,
                  test_ids: np.ndarray) -> Tuple[Optional[Dict[str, Dict[int, np.ndarray]]], Optional[str]]:
    """Reads the pictures of the shown examples from the audit's sources.

    Args:
        config: the ``config`` of the manifest (source specs, ``input_shape``, ``scale``).
        train_ids: training ids to draw.
        test_ids: test ids to draw.

    Returns:
        ({"train": {id: picture}, "test": {id: picture}}, None) when both sources hold images,
        else (None, a note saying why the page shows ids and values instead).
    """
    pictures = {}
    for role, ids in (("train", train_ids), ("test", test_ids)):
        pictures[role], note = load_role_pictures(config, role, ids)
        if note is not None:
            return None, note
    return pictures, None


def write_thumbnail(path: str, picture: np.ndarray) -> str:
    """Writes a picture as an 8-bit PNG at its own size (grey values stretched to 0..255).

    Returns:
        The file's name.
    """
    from PIL import Image

    pic = np.asarray(picture, dtype=np.float64)
    lo, hi = float(np.min(pic)), float(np.max(pic))
    if pic.ndim == 2:  # grey: stretched like imshow does; colour is already in [0, 1]
        pic = (pic - lo) / (hi - lo if hi > lo else 1.0)
    img = Image.fromarray(np.clip(np.round(pic * 255.0), 0, 255).astype(np.uint8))
    img.save(path, format="PNG")
    return os.path.basename(path)


def new_figure(width: float, height: float):
    """A Matplotlib figure of the given size in inches, on no pyplot state (see the module)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=FIGURE_DPI)


def save_figure(fig, path: str) -> str:
    """Writes the figure as PNG and returns the name the page links to (relative to the page)."""
    fig.savefig(path, format="png", bbox_inches="tight")
    return os.path.basename(path)
