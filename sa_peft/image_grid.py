"""One renderer for every picture grid sa-peft writes: validation, evaluation and attack grids.

    render_grid([("a handwritten digit zero", before + after), ...],
                column_headers=["before (base model)", "after (step 400)"], title="validation")

draws one row per label, the label on the left (wrapped), a header over each group of columns and an
optional title on top. Small images are enlarged with nearest-neighbour (a 16-pixel digit stays crisp,
blurring it would hide what the model drew); large ones can be shrunk with ``max_cell_px``.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

Row = tuple[str, Sequence["Image.Image | None"]]

# 96 px per sample: at 1:1 the digits model's 16-pixel samples made a 164 × 56 grid nobody could read (issue 18).
DEFAULT_MIN_CELL_PX = 96


def load_font(size: int) -> ImageFont.ImageFont:
    """Pillow's bundled scalable font at ``size`` px (Pillow >= 10.1), else its fixed bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow 10.0: no size argument, no bundled TrueType font
        return ImageFont.load_default()


def cell_size(image_size: tuple[int, int], min_cell_px: int, max_cell_px: int | None) -> tuple[int, int]:
    """The drawn size of one sample: enlarged by a whole factor up to ``min_cell_px`` (so nearest-neighbour
    keeps square pixels), or shrunk to fit ``max_cell_px``; the aspect ratio is kept."""
    w, h = image_size
    side = max(w, h)
    if side < min_cell_px:
        factor = math.ceil(min_cell_px / side)
        return w * factor, h * factor
    if max_cell_px is not None and side > max_cell_px:
        return max(1, round(w * max_cell_px / side)), max(1, round(h * max_cell_px / side))
    return w, h


def _fit(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    image = image.convert("RGB")
    if image.size == size:
        return image
    smaller = size[0] < image.size[0]
    return image.resize(size, Image.Resampling.LANCZOS if smaller else Image.Resampling.NEAREST)


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def render_grid(
    rows: Sequence[Row],
    column_headers: Sequence[str] | None = None,
    title: str | None = None,
    min_cell_px: int = DEFAULT_MIN_CELL_PX,
    max_cell_px: int | None = 512,
    pad: int = 4,
) -> Image.Image:
    """Render labelled rows of images into one RGB picture.

    rows: ``(label, images)`` per row; a ``None`` image leaves its cell blank (e.g. a prompt one model was not
        sampled on). Cells take the size of the first image, enlarged to at least ``min_cell_px`` (whole-factor
        nearest-neighbour) or shrunk to at most ``max_cell_px`` (``None``: never shrunk).
    column_headers: one header per group of columns; the columns are split evenly between the groups (2
        headers over 8 columns: 4 each), with a gap between groups. ``None``: one group, no header.
    title: a line above everything (e.g. ``"validation, step 400"``).
    """
    if not rows or not any(img is not None for _, images in rows for img in images):
        raise ValueError("render_grid needs at least one row with an image")
    ncols = max(len(images) for _, images in rows)
    groups = list(column_headers) if column_headers else [""]
    if ncols % len(groups):
        raise ValueError(f"{ncols} columns cannot be split evenly between {len(groups)} column headers")
    per_group = ncols // len(groups)
    first = next(img for _, images in rows for img in images if img is not None)
    cw, ch = cell_size(first.size, min_cell_px, max_cell_px)
    font = load_font(max(12, min(20, ch // 5)))
    title_font = load_font(max(14, min(24, ch // 4)))
    gap = max(pad, cw // 6)  # between groups, so "before" and "after" read as two blocks
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrap = max(12, (2 * cw) // max(1, _text_size(scratch, "n", font)[0]))
    # The empty prompt (unconditional) is shown as '' so its row is not mistaken for a missing label.
    labels = ["''" if label == "" else "\n".join(textwrap.wrap(label, wrap, max_lines=4, placeholder=" ..."))
              for label, _ in rows]
    label_w = max(_text_size(scratch, text, font)[0] for text in labels) + 2 * pad
    header_h = (_text_size(scratch, "Ag", font)[1] + 2 * pad) if column_headers else 0
    title_h = (_text_size(scratch, title, title_font)[1] + 2 * pad) if title else 0
    row_hs = [max(ch, _text_size(scratch, text, font)[1]) for text in labels]
    block_w = max(per_group * (cw + pad), max(_text_size(scratch, h, font)[0] for h in groups) + pad)
    width = label_w + len(groups) * block_w + (len(groups) - 1) * gap + pad
    if title:
        width = max(width, _text_size(scratch, title, title_font)[0] + 2 * pad)
    height = title_h + header_h + sum(h + pad for h in row_hs) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, pad), title, fill="black", font=title_font)
    for g, header in enumerate(groups):
        draw.text((label_w + g * (block_w + gap), title_h + pad), header, fill="black", font=font)
    y = title_h + header_h + pad
    for (_, images), text, row_h in zip(rows, labels, row_hs):
        draw.multiline_text((pad, y + (row_h - _text_size(draw, text, font)[1]) // 2), text, fill="black", font=font)
        for j, image in enumerate(images):
            if image is not None:
                g, k = divmod(j, per_group)
                canvas.paste(_fit(image, (cw, ch)), (label_w + g * (block_w + gap) + k * (cw + pad), y + (row_h - ch) // 2))
        y += row_h + pad
    return canvas
