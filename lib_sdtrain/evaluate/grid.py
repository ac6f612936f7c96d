"""A labelled picture grid (PIL only): row labels on the left, column labels on top, a note under each cell.

The layout is computed first (`grid_layout`) and returned with the picture, so callers and tests know
where each cell and label went.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from ..errors import UserError

PAD = 6
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
NOTE_INK = (70, 70, 150)


def _font(size: int = 13):
    """Pillow's built-in font; scalable since Pillow 10.1, a fixed bitmap before (A1111 pins Pillow 9.5)."""
    try:
        return ImageFont.load_default(size=size)   # type: ignore[call-arg]
    except TypeError:
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    if not text:
        return 0, 0
    box = draw.multiline_textbbox((0, 0), text, font=font, spacing=2)
    return box[2] - box[0], box[3] - box[1]


def _wrap(text: str, width_chars: int) -> str:
    return "\n".join(textwrap.fill(line, width=max(4, width_chars)) or " " for line in text.split("\n"))


@dataclass
class GridLayout:
    """Where things are in a grid picture (pixel boxes are (left, top, right, bottom))."""

    size: tuple[int, int]
    cell_boxes: list[list[tuple[int, int, int, int]]]          # [row][col]
    row_labels: list[str]
    col_labels: list[str]
    notes: list[list[str]] = field(default_factory=list)
    title: str = ""

    @property
    def rows(self) -> int:
        return len(self.cell_boxes)

    @property
    def cols(self) -> int:
        return len(self.cell_boxes[0]) if self.cell_boxes else 0

    def to_dict(self) -> dict:
        return {"size": list(self.size), "rows": self.rows, "cols": self.cols, "row_labels": self.row_labels,
                "col_labels": self.col_labels, "notes": self.notes, "title": self.title,
                "cell_boxes": [[list(b) for b in row] for row in self.cell_boxes]}   # to crop a cell back out


def draw_grid(images: Sequence[Sequence[Image.Image | None]], row_labels: Sequence[str], col_labels: Sequence[str],
              *, notes: Sequence[Sequence[str]] | None = None, title: str = "", cell_size: int = 0
              ) -> tuple[Image.Image, GridLayout]:
    """Draw `images[row][col]` with labels.

    Args:
        images: rows of pictures, all rows the same length; None leaves a cell blank (a stopped run).
        row_labels, col_labels: one per row / column (wrapped to fit).
        notes: optional text under each cell (e.g. a concept score).
        title: a line above everything (run name, settings).
        cell_size: side of a cell in pixels; 0 = the first picture's width, at least 128 (small pictures are
            enlarged without smoothing so their pixels stay visible).
    Returns:
        (the grid picture, its layout).
    """
    n_rows = len(images)
    n_cols = len(images[0]) if n_rows else 0
    if not n_rows or not n_cols:
        raise UserError("nothing to draw: the grid has no cells")
    if any(len(r) != n_cols for r in images):
        raise UserError("every grid row needs the same number of cells")
    if len(row_labels) != n_rows or len(col_labels) != n_cols:
        raise UserError(f"{n_rows}×{n_cols} cells need {n_rows} row labels and {n_cols} column labels "
                        f"(got {len(row_labels)} and {len(col_labels)})")
    if notes is not None and (len(notes) != n_rows or any(len(r) != n_cols for r in notes)):
        raise UserError("notes must have one entry per cell")
    first = next((im for row in images for im in row if im is not None), None)
    if cell_size <= 0:
        cell_size = max(128, first.width if first is not None else 128)
    font = _font(13)
    scratch = ImageDraw.Draw(Image.new("RGB", (8, 8)))
    char_w = max(1, _text_size(scratch, "abcdefghij", font)[0] // 10)
    cols_text = [_wrap(t, cell_size // char_w) for t in col_labels]
    rows_text = [_wrap(t, 22) for t in row_labels]
    notes_text = [[_wrap(n, cell_size // char_w) for n in r] for r in notes] if notes else None
    left = max(_text_size(scratch, t, font)[0] for t in rows_text) + 2 * PAD
    top = max(_text_size(scratch, t, font)[1] for t in cols_text) + 2 * PAD
    title_text = _wrap(title, max(40, (left + n_cols * (cell_size + PAD)) // char_w)) if title else ""
    title_h = _text_size(scratch, title_text, font)[1] + 2 * PAD if title else 0
    note_h = (max(_text_size(scratch, n, font)[1] for r in notes_text for n in r) + PAD) if notes_text else 0
    row_h = cell_size + note_h + PAD
    width = left + n_cols * (cell_size + PAD) + PAD
    height = title_h + top + n_rows * row_h + PAD
    grid = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    if title_text:
        draw.multiline_text((PAD, PAD), title_text, fill=INK, font=font, spacing=2)
    boxes: list[list[tuple[int, int, int, int]]] = []
    for c, text in enumerate(cols_text):
        x = left + c * (cell_size + PAD)
        tw, th = _text_size(draw, text, font)
        draw.multiline_text((x + (cell_size - tw) // 2, title_h + top - PAD - th), text, fill=INK, font=font,
                            spacing=2, align="center")
    for r in range(n_rows):
        y = title_h + top + r * row_h
        tw, th = _text_size(draw, rows_text[r], font)
        draw.multiline_text((PAD, y + (cell_size - th) // 2), rows_text[r], fill=INK, font=font, spacing=2)
        row_boxes = []
        for c in range(n_cols):
            x = left + c * (cell_size + PAD)
            box = (x, y, x + cell_size, y + cell_size)
            row_boxes.append(box)
            im = images[r][c]
            if im is None:
                draw.rectangle(box, outline=(200, 200, 200))
            else:
                im = im.convert("RGB")
                if im.size != (cell_size, cell_size):
                    smaller = im.width < cell_size
                    im = im.resize((cell_size, cell_size), Image.NEAREST if smaller else Image.LANCZOS)
                grid.paste(im, box[:2])
            if notes_text and notes_text[r][c]:
                draw.multiline_text((x, y + cell_size + 2), notes_text[r][c], fill=NOTE_INK, font=font, spacing=2)
        boxes.append(row_boxes)
    layout = GridLayout((width, height), boxes, list(row_labels), list(col_labels),
                        [list(r) for r in notes] if notes else [], title)
    return grid, layout
