"""Image preprocessing of LaVIN (docs/method.md): resize to a square bicubic (no crop), scale to [0, 1], normalise
with ImageNet mean/std (the released checkpoints expect ImageNet's, not CLIP's constants).

Any mode Pillow reads becomes RGB by what its pixels mean (:func:`to_rgb`): 16-bit and 32-bit grayscale are
scaled by their range (Pillow's own conversion clips them, so a 16-bit PNG turned all white), transparent
pixels are composed over white (the background easy-vqa and most diagrams have), CMYK, palette and 1-bit
images through Pillow's conversions. An animated image gives its first frame, with a warning.

Every failure raises ``ImageError`` naming the path and the reason, so data loaders can report bad records."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageError(ValueError):
    """An image that cannot be used: ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


_GRAY_WIDE = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA = ("RGBA", "LA", "PA", "La", "RGBa")


def _gray_to_8bit(a: np.ndarray, mode: str) -> np.ndarray:
    """A wide grayscale array -> uint8 by its range: the 16-bit range for I;16, else the smallest of
    [0, 1] (float), [0, 255], [0, 65535] that holds the values, else the values' own min..max."""
    a = np.nan_to_num(a.astype(np.float64))
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if mode.startswith("I;16"):
        scale = a / 65535.0
    elif mode == "F" and lo >= 0 and hi <= 1:
        scale = a
    elif lo >= 0 and hi <= 255:
        scale = a / 255.0
    elif lo >= 0 and hi <= 65535:
        scale = a / 65535.0
    else:
        scale = (a - lo) / (hi - lo if hi > lo else 1.0)
    return np.clip(np.rint(scale * 255.0), 0, 255).astype(np.uint8)


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB by what the pixels mean (see the module docstring)."""
    if im.mode == "RGB" and "transparency" not in im.info:
        return im
    if im.mode in _GRAY_WIDE:
        return Image.fromarray(_gray_to_8bit(np.asarray(im), im.mode), "L").convert("RGB")
    if im.mode in _ALPHA or "transparency" in im.info:
        rgba = im.convert("RGBA")
        out = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        out.alpha_composite(rgba)
        return out.convert("RGB")
    return im.convert("RGB")


def _open_rgb(path: Path) -> Image.Image:
    if not path.exists():
        raise ImageError(path, "file not found")
    if not path.is_file():
        raise ImageError(path, "not a file")
    # PIL only warns below 2x MAX_IMAGE_PIXELS; a training run should refuse those files as well.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as im:
                frames = getattr(im, "n_frames", 1)
                if frames > 1:
                    im.seek(0)
                    warnings.warn(f"{path}: animated image ({frames} frames): using its first frame", stacklevel=2)
                im.load()  # decode now: truncated files fail here, not later inside the model
                return to_rgb(im)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageError(path, f"decompression bomb ({e})") from e
        except UnidentifiedImageError as e:
            raise ImageError(path, "not an image (unrecognised format)") from e
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageError(path, f"truncated or corrupt image ({e})") from e


def _normalised_hwc(im: Image.Image, size: int) -> np.ndarray:
    """float32 [size, size, 3]: bicubic resize without crop, / 255, ImageNet mean and std per channel."""
    im = to_rgb(im)
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BICUBIC)
    x = np.asarray(im, dtype=np.float32) / np.float32(255.0)
    return (x - np.asarray(IMAGENET_MEAN, dtype=np.float32)) / np.asarray(IMAGENET_STD, dtype=np.float32)


def image_array(im: Image.Image, size: int = 224) -> np.ndarray:
    """A PIL image -> float32 [3, size, size] (contiguous NumPy: the engine without PyTorch takes it as it is)."""
    return np.ascontiguousarray(_normalised_hwc(im, size).transpose(2, 0, 1))


def load_image_array(path: str | Path, size: int = 224) -> np.ndarray:
    """Read an image file -> float32 [3, size, size] NumPy array; ``ImageError`` (path + reason) on any failure."""
    return image_array(_open_rgb(Path(path)), size)


def preprocess(im: Image.Image, size: int = 224) -> torch.Tensor:
    """A PIL image -> float32 [3, size, size] tensor, the same values as ``image_array``. It stays a
    channels-last view of the [size, size, 3] pixels, as it always was: the demo is calibrated on such tensors,
    and a contiguous copy takes other (equally exact) summation orders in the vision tower's gathers and
    convolutions, which moved a near-tie in the built demo's answers."""
    import torch

    return torch.from_numpy(_normalised_hwc(im, size)).permute(2, 0, 1)


def load_image(path: str | Path, size: int = 224) -> torch.Tensor:
    """Read an image file -> float32 [3, size, size]; raises ``ImageError`` (path + reason) on any failure."""
    return preprocess(_open_rgb(Path(path)), size)
