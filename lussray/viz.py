"""Pictures of segmentations: one palette for every label map, heat maps, panels, PNG bytes, SVG curves.

Pure NumPy + Pillow (no Ray, no matplotlib), so the report and ``lussray peek`` draw the same way.
Label ids follow ImageNet-S: 0 = other (black), 1000 = ignore (white), 1..999 = categories.
"""

from __future__ import annotations

import base64
import colorsys
import html
import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

IGNORE_ID = 1000
GOLDEN = 0.618033988749895  # hue step: neighbouring ids get far-apart hues


def palette(num_ids: int = IGNORE_ID + 1) -> np.ndarray:
    """(num_ids, 3) uint8 colours: id 0 black, id 1000 white, the rest well-separated and saturated."""
    colours = np.zeros((max(num_ids, IGNORE_ID + 1), 3), np.uint8)
    for i in range(1, colours.shape[0]):
        hue = (i * GOLDEN) % 1.0
        value, saturation = (0.95, 0.7, 0.5)[i % 3], (0.85, 0.5)[(i // 3) % 2]
        colours[i] = np.round(np.array(colorsys.hsv_to_rgb(hue, saturation, value)) * 255)
    colours[IGNORE_ID] = 255
    return colours


_PALETTE = palette()


def colorize(label: np.ndarray) -> np.ndarray:
    """(H, W) ids -> (H, W, 3) uint8 colours (ids beyond the palette wrap around it)."""
    return _PALETTE[np.asarray(label, np.int64) % len(_PALETTE)]


def heatmap(values: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8, dark blue (0) through red to yellow (1)."""
    v = np.clip(np.asarray(values, np.float32), 0.0, 1.0)[..., None]
    low, mid, high = np.array([20, 20, 90.0]), np.array([200, 40, 40.0]), np.array([255, 240, 80.0])
    rgb = np.where(v < 0.5, low + (mid - low) * (v / 0.5), mid + (high - mid) * ((v - 0.5) / 0.5))
    return rgb.astype(np.uint8)


def resize_to_height(image: np.ndarray, height: int, *, nearest: bool = False) -> np.ndarray:
    """An (h, w, 3) uint8 image scaled to ``height`` rows, keeping its aspect ratio."""
    h, w = image.shape[:2]
    width = max(1, round(w * height / h))
    resample = Image.NEAREST if nearest else Image.BILINEAR
    return np.asarray(Image.fromarray(image).resize((width, height), resample))


def png_bytes(image: np.ndarray) -> bytes:
    """PNG encoding of an (H, W, 3) or (H, W) uint8 array."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def img_tag(image: np.ndarray, title: str = "", height: int | None = None) -> str:
    """An ``<img>`` with the PNG embedded as a data URI (the report is one self-contained file)."""
    data = base64.b64encode(png_bytes(image)).decode()
    size = f' height="{height}"' if height else ""
    return f'<img src="data:image/png;base64,{data}" title="{html.escape(title)}"{size}>'


def svg_curves(series: dict[str, Sequence[tuple[float, float]]], *, width: int = 420, height: int = 220,
               title: str = "") -> str:
    """An inline SVG line chart of named (x, y) series with min/max axis labels."""
    points = [p for values in series.values() for p in values]
    if not points:
        return ""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    left, right, top, bottom = 48, 10, 22, 24

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def sy(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * (height - top - bottom)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11">',
             f'<text x="{left}" y="14" font-weight="bold">{html.escape(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
             'fill="none" stroke="#999"/>',
             f'<text x="2" y="{top + 10}">{y1:.3g}</text><text x="2" y="{height - bottom}">{y0:.3g}</text>',
             f'<text x="{left}" y="{height - 6}">{x0:.0f}</text>'
             f'<text x="{width - right - 30}" y="{height - 6}">{x1:.0f}</text>']
    for index, (name, values) in enumerate(series.items()):
        colour = "#%02x%02x%02x" % tuple(int(c) for c in _PALETTE[index + 1])
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in values)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{path}"/>')
        parts.append(f'<text x="{width - right - 110}" y="{top + 14 + 13 * index}" fill="{colour}">'
                     f'{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)
