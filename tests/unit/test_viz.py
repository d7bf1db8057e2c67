"""Pictures: one palette (other black, ignore white, distinct categories), heat maps, panels, curves."""

import io

import numpy as np
from PIL import Image

from lussray.viz import colorize, heatmap, img_tag, palette, png_bytes, resize_to_height, svg_curves


def test_palette_fixes_other_and_ignore_and_separates_categories():
    colours = palette()
    assert colours.shape == (1001, 3) and colours.dtype == np.uint8
    assert (colours[0] == 0).all() and (colours[1000] == 255).all()
    for count, min_distance in ((10, 60), (50, 10)):
        first = colours[1:count + 1].astype(int)
        distances = np.abs(first[:, None] - first[None]).sum(-1) + np.eye(count, dtype=int) * 999
        assert distances.min() > min_distance  # L1 over RGB: the first ten are far apart


def test_colorize_maps_ids_through_the_palette():
    label = np.array([[0, 1], [1000, 3]])
    rgb = colorize(label)
    assert rgb.shape == (2, 2, 3)
    assert (rgb[0, 0] == 0).all() and (rgb[1, 0] == 255).all() and (rgb[0, 1] == palette()[1]).all()


def test_heatmap_runs_from_dark_to_bright():
    rgb = heatmap(np.array([[0.0, 0.5, 1.0, 7.0]]))
    brightness = rgb.astype(int).sum(-1)[0]
    assert brightness[0] < brightness[1] < brightness[2] and (rgb[0, 3] == rgb[0, 2]).all()


def test_panels_and_png_round_trip():
    image = np.zeros((10, 20, 3), np.uint8)
    image[:, 10:] = 200
    resized = resize_to_height(image, 30, nearest=True)
    assert resized.shape == (30, 60, 3) and resized[0, 0, 0] == 0 and resized[0, -1, 0] == 200
    back = np.asarray(Image.open(io.BytesIO(png_bytes(resized))))
    assert np.array_equal(back, resized)
    assert img_tag(resized, 'a "title"').startswith('<img src="data:image/png;base64,')


def test_svg_curves_draws_one_line_per_series():
    svg = svg_curves({"loss": [(0, 3.0), (10, 2.0)], "acc": [(0, 0.1), (10, 0.9)]}, title="finetune")
    assert svg.count("<polyline") == 2 and "finetune" in svg
    assert svg_curves({}) == ""
