"""``image_url`` values -> preprocessed images, with the limits a server needs.

Accepted: ``data:image/<type>;base64,<data>`` URLs; with ``--allow-files DIR`` also ``file://`` URLs (or
plain paths) of files under DIR (resolved first, so ``..`` and symlinks out of DIR are refused). Nothing is
ever fetched over the network. Limits: the encoded image's bytes (413 over ``max_bytes``) and its pixel count,
read from the header before decoding (413 over ``max_pixels``: decompression bombs never get decoded; Pillow's
own limit is kept at or above it, so the 413 always names the server's).
Decoded pixels go through ``lavin_edge.data.image.preprocess``, the same preprocessing as chat and training.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import torch
from PIL import Image, UnidentifiedImageError

from lavin_edge.data.image import preprocess
from lavin_edge.serve.errors import APIError, bad_request

DATA_URL = re.compile(r"data:(?P<mime>image/[A-Za-z0-9.+-]+)(?P<params>(;[^,;]*)*?);base64,(?P<data>.*)", re.S)


@dataclass
class ImageLimits:
    max_bytes: int = 8 << 20
    max_pixels: int = 4096 * 4096
    allow_files: Path | None = None


def image_bytes(url: str, limits: ImageLimits, param: str) -> bytes:
    """The encoded image behind ``url`` (APIError 400/413 naming ``param``)."""
    if not isinstance(url, str) or not url:
        raise bad_request(f"{param} must be a non-empty string", param)
    if url.startswith("data:"):
        m = DATA_URL.fullmatch(url)
        if m is None:
            raise bad_request(f"{param}: a data URL must look like data:image/png;base64,<data>", param)
        data = m.group("data")
        if len(data) * 3 // 4 > limits.max_bytes + 3:
            raise APIError(413, f"{param}: image of about {len(data) * 3 // 4} bytes is over the limit of "
                           f"{limits.max_bytes} bytes (--max-image-bytes)", param, "image_too_large")
        try:
            raw = base64.b64decode(re.sub(r"\s+", "", data), validate=True)
        except (binascii.Error, ValueError) as e:
            raise bad_request(f"{param}: invalid base64 data ({e})", param, "invalid_base64") from e
        if not raw:
            raise bad_request(f"{param}: empty image data", param)
        return raw
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https", "ftp"):
        raise bad_request(f"{param}: only data:image/...;base64 URLs are accepted (this server fetches nothing)",
                          param, "unsupported_url")
    if limits.allow_files is None:
        raise bad_request(f"{param}: only data:image/...;base64 URLs are accepted (local files need the server's "
                          "--allow-files DIR)", param, "unsupported_url")
    if parsed.scheme not in ("file", ""):
        raise bad_request(f"{param}: URL scheme {parsed.scheme!r} is not accepted (data: or file:)", param,
                          "unsupported_url")
    if parsed.scheme == "file":
        # file:///abs/path, or file://name/rest read as a name relative to the allowed directory
        host = parsed.netloc if parsed.netloc not in ("", "localhost") else ""
        name = unquote(host + parsed.path)
    else:
        name = url
    return read_allowed_file(name, limits, param)


def read_allowed_file(name: str, limits: ImageLimits, param: str) -> bytes:
    """A file's bytes, only when it resolves inside ``limits.allow_files`` (relative names are taken from there)."""
    assert limits.allow_files is not None
    root = limits.allow_files.resolve()
    path = (root / name).resolve()  # an absolute name replaces root; resolve() follows .. and symlinks
    if not path.is_relative_to(root):
        raise bad_request(f"{param}: {name!r} is outside the allowed directory", param, "path_not_allowed")
    if not path.is_file():
        raise bad_request(f"{param}: {name!r}: no such file under the allowed directory", param, "file_not_found")
    size = path.stat().st_size
    if size > limits.max_bytes:
        raise APIError(413, f"{param}: file of {size} bytes is over the limit of {limits.max_bytes} bytes "
                       "(--max-image-bytes)", param, "image_too_large")
    return path.read_bytes()


def allow_pixels(limits: ImageLimits) -> None:
    """Raise Pillow's own decompression-bomb limit (process-wide) to at least the server's, so that every image
    refused for its size is refused by the server's limit, named as such: Pillow's warns above its limit and
    refuses above twice that (178,956,970 pixels by default), whatever --max-image-pixels says."""
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < limits.max_pixels:
        Image.MAX_IMAGE_PIXELS = limits.max_pixels


def too_many_pixels(param: str, limits: ImageLimits, pixels: int | None, size: str = "") -> APIError:
    what = f"image of {size}{pixels} pixels" if pixels is not None else "image"
    return APIError(413, f"{param}: {what} is over the limit of {limits.max_pixels} pixels (--max-image-pixels)",
                    param, "image_too_large")


def decode_image(raw: bytes, limits: ImageLimits, size: int, param: str) -> torch.Tensor:
    """Encoded bytes -> float32 [3, size, size] (APIError 400 when not an image, 413 over the pixel limit)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(raw)) as im:
                w, h = im.size
                if w * h > limits.max_pixels:
                    raise too_many_pixels(param, limits, w * h, f"{w}x{h} = ")
                im.load()
                return preprocess(im, size)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            # Pillow's own check, at open: over its limit, which allow_pixels keeps at or above the server's.
            m = re.search(r"\((\d+) pixels\)", str(e))
            raise too_many_pixels(param, limits, int(m.group(1)) if m else None) from e
        except UnidentifiedImageError as e:
            raise bad_request(f"{param}: the data is not an image (unrecognised format)", param,
                              "invalid_image") from e
        except (OSError, SyntaxError, ValueError) as e:
            raise bad_request(f"{param}: truncated or corrupt image ({e})", param, "invalid_image") from e


def load_image_url(url: str, limits: ImageLimits, size: int, param: str) -> torch.Tensor:
    return decode_image(image_bytes(url, limits, param), limits, size, param)
