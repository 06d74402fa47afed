"""Image preprocessing of LaVIN (DESIGN.md section 1): resize to a square bicubic (no crop), scale to [0, 1],
normalise with ImageNet mean/std (the released checkpoints expect ImageNet's, not CLIP's constants).

Every failure raises ``ImageError`` naming the path and the reason, so data loaders can report bad records."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageError(ValueError):
    """An image that cannot be used: ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


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
                im.load()  # decode now: truncated files fail here, not later inside the model
                return im.convert("RGB")
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageError(path, f"decompression bomb ({e})") from e
        except UnidentifiedImageError as e:
            raise ImageError(path, "not an image (unrecognised format)") from e
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageError(path, f"truncated or corrupt image ({e})") from e


def preprocess(im: Image.Image, size: int = 224) -> torch.Tensor:
    """A PIL image -> float32 [3, size, size], bicubic resize without crop, ImageNet-normalised."""
    im = im.convert("RGB")
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1).div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def load_image(path: str | Path, size: int = 224) -> torch.Tensor:
    """Read an image file -> float32 [3, size, size]; raises ``ImageError`` (path + reason) on any failure."""
    return preprocess(_open_rgb(Path(path)), size)
