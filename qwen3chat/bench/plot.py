"""`qwen3chat bench --plot`: decode tokens/s against context depth, as a PNG.

Drawn with Pillow's ImageDraw (already a dependency for images) rather than a plotting
library: a line chart with one series per prompt/gen combination needs little more than
axes, ticks and polylines.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..errors import QwenChatError

WIDTH, HEIGHT = 800, 500
LEFT, RIGHT, TOP, BOTTOM = 80, 30, 80, 60  # margins around the plot area (legend on top)
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf")
GRID, AXIS, TEXT = "#dddddd", "#333333", "#111111"
MARKER_RADIUS = 4

# One series: (context depth, decode tokens/s) points, in depth order.
Series = list[tuple[int, float]]


def check_plot_path(path: Path) -> None:
    """Fail before a long run rather than after it when the PNG could not be written."""
    if path.is_dir():
        raise QwenChatError(f"--plot: {path} is a directory; give a file name such as speed.png")
    parent = path.parent
    if not parent.is_dir():
        raise QwenChatError(f"--plot: directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise QwenChatError(f"--plot: directory {parent} is not writable; choose another path")


def plot_decode_speed(series: dict[str, Series], path: Path, title: str) -> None:
    """Draw ``series`` (label -> points) and write the PNG to ``path`` atomically."""
    save_atomically(draw_chart(series, title), path)


def draw_chart(series: dict[str, Series], title: str) -> Image.Image:
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    depths = sorted({depth for points in series.values() for depth, _ in points})
    top_speed = max((speed for points in series.values() for _, speed in points), default=0.0)
    y_step = nice_step(top_speed)
    y_max = y_step * max(1, math.ceil(top_speed / y_step))
    x_max = max(depths[-1], 1)  # a single depth 0 still needs a non-empty axis

    def point(depth: float, speed: float) -> tuple[float, float]:
        x = LEFT + (WIDTH - LEFT - RIGHT) * depth / x_max
        y = HEIGHT - BOTTOM - (HEIGHT - TOP - BOTTOM) * speed / y_max
        return x, y

    for i in range(round(y_max / y_step) + 1):
        speed = i * y_step
        _, y = point(0, speed)
        draw.line([(LEFT, y), (WIDTH - RIGHT, y)], fill=GRID)
        draw.text((LEFT - 8, y), f"{speed:g}", fill=TEXT, font=font, anchor="rm")
    for depth in depths:
        x, _ = point(depth, 0)
        draw.line([(x, HEIGHT - BOTTOM), (x, HEIGHT - BOTTOM + 5)], fill=AXIS)
        draw.text((x, HEIGHT - BOTTOM + 8), str(depth), fill=TEXT, font=font, anchor="mt")
    draw.line([(LEFT, TOP), (LEFT, HEIGHT - BOTTOM), (WIDTH - RIGHT, HEIGHT - BOTTOM)], fill=AXIS)
    draw.text((WIDTH / 2, 20), title, fill=TEXT, font=font, anchor="mm")
    draw.text((LEFT - 8, TOP - 16), "decode tokens/s", fill=TEXT, font=font, anchor="lm")
    draw.text(
        ((LEFT + WIDTH - RIGHT) / 2, HEIGHT - 20),
        "context depth (tokens before the prompt)",
        fill=TEXT,
        font=font,
        anchor="mm",
    )
    for index, (label, points) in enumerate(series.items()):
        color = COLORS[index % len(COLORS)]
        xy = [point(depth, speed) for depth, speed in points]
        if len(xy) > 1:
            draw.line(xy, fill=color, width=2)
        for x, y in xy:
            r = MARKER_RADIUS
            draw.ellipse([(x - r, y - r), (x + r, y + r)], fill=color)
        # The legend runs in a row between the title and the plot, clear of the lines.
        legend_x, legend_y = LEFT + 120 * index, 42
        draw.line([(legend_x, legend_y), (legend_x + 20, legend_y)], fill=color, width=3)
        draw.text((legend_x + 26, legend_y), label, fill=TEXT, font=font, anchor="lm")
    return image


def nice_step(top: float, ticks: int = 5) -> float:
    """A round tick step (1, 2 or 5 times a power of ten) giving about ``ticks`` ticks."""
    if top <= 0:
        return 1.0
    raw = top / ticks
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def save_atomically(image: Image.Image, path: Path) -> None:
    """Write to a temporary file beside ``path``, then rename: readers never see half a PNG."""
    # Not mkstemp: its 0600 mode would stay on the PNG; a plain open honours the umask.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        image.save(temporary, format="PNG")
        os.replace(temporary, path)
    except OSError as e:
        temporary.unlink(missing_ok=True)
        raise QwenChatError(f"--plot: cannot write {path} ({e.strerror or e})") from None
