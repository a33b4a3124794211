"""A dependency-free PNG line plot (zlib + struct from the standard library): the training curves of a run."""

from __future__ import annotations

import struct
import zlib

import numpy as np

COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189))


def _png(image: np.ndarray) -> bytes:
    h, w, _ = image.shape
    raw = b"".join(b"\x00" + image[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))  # fmt: skip


def line_plot(path: str, series: dict[str, list[float]], width: int = 640, panel: int = 140) -> None:
    """One panel per series (each scaled to its own range), stacked vertically, written as a PNG. Colours in
    the order of ``series``; the names go to the caller's legend (the JSONL log has the numbers)."""
    names = list(series)
    image = np.full((panel * len(names), width, 3), 255, dtype=np.uint8)
    for k, name in enumerate(names):
        top = k * panel
        image[top + panel - 1, :] = 200  # panel separator
        values = np.asarray(series[name], dtype=np.float64)
        values = values[np.isfinite(values)]
        if values.size < 2:
            continue
        lo, hi = float(values.min()), float(values.max())
        span = hi - lo or 1.0
        xs = np.linspace(4, width - 5, values.size)
        ys = top + 5 + (1 - (values - lo) / span) * (panel - 12)
        for x0, y0, x1, y1 in zip(xs[:-1], ys[:-1], xs[1:], ys[1:], strict=True):
            steps = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
            px = np.linspace(x0, x1, steps).round().astype(int)
            py = np.linspace(y0, y1, steps).round().astype(int)
            for dy in (0, 1):
                image[np.clip(py + dy, 0, image.shape[0] - 1), px] = COLORS[k % len(COLORS)]
    with open(path, "wb") as f:
        f.write(_png(image))
