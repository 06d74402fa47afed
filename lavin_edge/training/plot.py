"""The loss curve as a PNG: matplotlib when installed, else drawn with Pillow (no heavy dependency)."""

from __future__ import annotations

import math
from pathlib import Path


def _smooth(ys: list[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= k:
            acc -= ys[i - k]
        out.append(acc / min(i + 1, k))
    return out


def plot_loss(steps: list[int], losses: list[float], path: str | Path, title: str = "training loss") -> Path:
    path = Path(path)
    pts = [(s, v) for s, v in zip(steps, losses, strict=True) if math.isfinite(v)]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.5))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=0.8, alpha=0.5, label="loss")
        ax.plot([p[0] for p in pts], _smooth([p[1] for p in pts], 20), lw=1.5, label="smoothed")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(title)
        ax.legend()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
    except ImportError:
        pass
    return _plot_pillow(pts, path, title)


def _plot_pillow(pts: list[tuple[int, float]], path: Path, title: str) -> Path:
    from PIL import Image, ImageDraw

    w, h, left, right, top, bottom = 800, 450, 70, 20, 40, 50
    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)
    d.text((left, 12), title, fill="black")
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    if pts:
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

        def to_px(x: float, y: float) -> tuple[float, float]:
            return (left + (x - x0) / (x1 - x0) * (w - left - right),
                    h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom))

        for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
            yv = y0 + frac * (y1 - y0)
            _, py = to_px(x0, yv)
            d.line([left - 4, py, left, py], fill="black")
            d.text((4, py - 6), f"{yv:.3g}", fill="black")
            xv = x0 + frac * (x1 - x0)
            px, _ = to_px(xv, y0)
            d.line([px, h - bottom, px, h - bottom + 4], fill="black")
            d.text((px - 10, h - bottom + 8), f"{int(xv)}", fill="black")
        if len(pts) > 1:
            d.line([to_px(x, y) for x, y in pts], fill=(150, 180, 230), width=1)
            d.line([to_px(x, y) for x, y in zip(xs, _smooth(ys, 20), strict=True)], fill=(20, 60, 160), width=2)
        d.text((w // 2 - 10, h - 20), "step", fill="black")
    tmp = path.with_suffix(".tmp.png")
    im.save(tmp, format="PNG")
    tmp.replace(path)
    return path
