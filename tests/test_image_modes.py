"""Every image mode Pillow reads becomes the RGB its pixels mean (issue 16: a 16-bit grayscale PNG used to turn
all white), and an animated image gives its first frame with a warning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lavin_edge.data.image import IMAGENET_MEAN, IMAGENET_STD, _open_rgb, load_image


def _pixels(path: Path) -> list[tuple[int, int, int]]:
    return [tuple(int(v) for v in px) for px in np.asarray(_open_rgb(path)).reshape(-1, 3)]


def test_16bit_grayscale_png_is_scaled_by_its_range(tmp_path: Path) -> None:
    a = np.array([[0, 16384, 32768, 65535]], dtype=np.uint16)
    p = tmp_path / "g16.png"
    Image.frombytes("I;16", (4, 1), a.astype("<u2").tobytes()).save(p)
    with Image.open(p) as im:
        assert im.mode in ("I;16", "I")  # what Pillow reads a 16-bit grayscale PNG as
    assert _pixels(p) == [(0, 0, 0), (64, 64, 64), (128, 128, 128), (255, 255, 255)]
    # Through the model's preprocessing too: not a white square.
    x = load_image(p, size=4)
    white = (1 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert not np.allclose(x[:, 0, 0].numpy(), white, atol=1e-3)


def test_palette_with_transparency_is_composed_over_white(tmp_path: Path) -> None:
    im = Image.new("P", (2, 1))
    im.putpalette([255, 0, 0, 0, 0, 0] + [0] * 762)  # 0: red, 1: black (transparent)
    im.putdata([0, 1])
    p = tmp_path / "p.png"
    im.save(p, transparency=1)
    assert _pixels(p) == [(255, 0, 0), (255, 255, 255)]


def test_la_and_rgba_are_composed_over_white(tmp_path: Path) -> None:
    la = Image.new("LA", (3, 1))
    la.putdata([(100, 255), (0, 0), (0, 128)])
    la.save(tmp_path / "la.png")
    assert _pixels(tmp_path / "la.png") == [(100, 100, 100), (255, 255, 255), (127, 127, 127)]
    rgba = Image.new("RGBA", (2, 1))
    rgba.putdata([(0, 0, 255, 255), (0, 0, 0, 0)])
    rgba.save(tmp_path / "rgba.png")
    assert _pixels(tmp_path / "rgba.png") == [(0, 0, 255), (255, 255, 255)]


def test_cmyk_one_bit_int_and_float(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (3, 1))
    cmyk.putdata([(0, 255, 255, 0), (0, 0, 0, 255), (0, 0, 0, 0)])
    cmyk.save(tmp_path / "cmyk.tif")
    assert _pixels(tmp_path / "cmyk.tif") == [(255, 0, 0), (0, 0, 0), (255, 255, 255)]
    one = Image.new("1", (2, 1))
    one.putdata([0, 1])
    one.save(tmp_path / "one.png")
    assert _pixels(tmp_path / "one.png") == [(0, 0, 0), (255, 255, 255)]
    i32 = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32))
    i32.save(tmp_path / "i.tif")
    assert _pixels(tmp_path / "i.tif") == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    f.save(tmp_path / "f.tif")
    assert _pixels(tmp_path / "f.tif") == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_animated_image_takes_the_first_frame_and_says_so(tmp_path: Path) -> None:
    p = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with pytest.warns(UserWarning, match="animated image .2 frames.: using its first frame"):
        px = _pixels(p)
    assert set(px) == {(255, 0, 0)}
