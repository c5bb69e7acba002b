"""Contact sheet: a search's query and hits as one PNG grid, labels and scores drawn on.

Tiles are squares of a fixed size in a grid read left to right, top to
bottom: the query first, framed in blue and captioned QUERY, then the hits in
rank order. A hit's frame is green when it shares a label with the query, red
when it does not, grey when the query's labels are unknown (an outside file).
An image whose file is gone becomes a grey placeholder tile saying so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import SearchError
from .search import SearchResult

BACKGROUND = (255, 255, 255)
QUERY_COLOUR = (0, 90, 200)
MATCH_COLOUR = (30, 150, 60)
MISMATCH_COLOUR = (200, 40, 40)
UNKNOWN_COLOUR = (128, 128, 128)
PLACEHOLDER_COLOUR = (215, 215, 215)
IMAGE_BACKGROUND = (30, 30, 30)
TEXT_COLOUR = (0, 0, 0)


@dataclass(frozen=True)
class SheetLayout:
    """Where each tile lies: ``tile`` px image squares with a ``border`` px frame and a
    ``caption`` px text band below the image, ``gap`` px apart and from the edges."""

    n_tiles: int
    columns: int
    tile: int = 160
    border: int = 4
    caption: int = 34
    gap: int = 8

    @property
    def rows(self) -> int:
        return -(-self.n_tiles // self.columns)

    @property
    def tile_width(self) -> int:
        return self.tile + 2 * self.border

    @property
    def tile_height(self) -> int:
        return self.tile + self.caption + 2 * self.border

    @property
    def size(self) -> tuple[int, int]:
        return (self.columns * (self.tile_width + self.gap) + self.gap,
                self.rows * (self.tile_height + self.gap) + self.gap)

    def box(self, position: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of tile ``position`` (0 = query), frame included."""
        row, col = divmod(position, self.columns)
        left = self.gap + col * (self.tile_width + self.gap)
        top = self.gap + row * (self.tile_height + self.gap)
        return left, top, left + self.tile_width, top + self.tile_height


@dataclass(frozen=True)
class Sheet:
    """A written contact sheet: where, its layout, and the sources drawn as placeholders."""

    path: Path
    layout: SheetLayout
    missing: list[str]


def contact_sheet(result: SearchResult, path: str | Path, columns: int | None = None,
                  tile: int = 160, dicom=None) -> Sheet:
    """Draw ``result`` (query + hits) as a PNG at ``path``.

    columns: tiles per row; by default up to 6 (query and five hits per row).
    dicom: how DICOM sources are read (``Store.dicom_options``: as at ingest).
    """
    from PIL import Image, ImageDraw

    n_tiles = 1 + len(result.hits)
    layout = SheetLayout(n_tiles=n_tiles, columns=columns or min(n_tiles, 6), tile=tile)
    sheet = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = _font(max(10, tile // 13))
    missing: list[str] = []

    query = result.query
    query_labels = set(query.image.labels) if query.image is not None else None
    if query.image is not None:
        name = query.image.image_id
    else:
        name = Path(query.source.partition("#")[0]).name
    caption = [f"QUERY {name}",
               ", ".join(sorted(query_labels)) if query_labels else "label unknown"]
    _tile(sheet, draw, layout, 0, query.source, QUERY_COLOUR, caption, font, missing, dicom)
    for hit in result.hits:
        if query_labels is None:
            colour = UNKNOWN_COLOUR
        elif query_labels & set(hit.image.labels):
            colour = MATCH_COLOUR
        else:
            colour = MISMATCH_COLOUR
        caption = [f"#{hit.rank} {hit.image.image_id}",
                   f"{', '.join(hit.image.labels) or '-'}  {hit.score:.3f}"]
        _tile(sheet, draw, layout, hit.rank, hit.image.source, colour, caption, font, missing, dicom)
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sheet.save(path, format="PNG")
    except OSError as exc:
        raise SearchError(f"cannot write the contact sheet {path}: {exc}") from exc
    return Sheet(path=path, layout=layout, missing=missing)


def _tile(sheet, draw, layout: SheetLayout, position: int, source: str, colour, caption: list[str],
          font, missing: list[str], dicom=None) -> None:
    from PIL import ImageOps

    from .sources import open_source

    left, top, right, bottom = layout.box(position)
    b = layout.border
    draw.rectangle((left, top, right - 1, bottom - 1), fill=colour)
    image_box = (left + b, top + b, right - b - 1, top + b + layout.tile - 1)
    text_top = top + b + layout.tile
    draw.rectangle((left + b, text_top, right - b - 1, bottom - b - 1), fill=BACKGROUND)
    try:
        image = open_source(source, dicom)
        image = ImageOps.contain(image.convert("RGB"), (layout.tile, layout.tile))
    except (OSError, SyntaxError, ValueError, SearchError) as exc:
        missing.append(source)
        draw.rectangle(image_box, fill=PLACEHOLDER_COLOUR)
        reason = "file not found" if isinstance(exc, FileNotFoundError) else "unreadable image"
        name = Path(source.partition("#")[0]).name
        _text(draw, (image_box[0] + 4, image_box[1] + 4), [reason, name], font, layout.tile - 8)
    else:
        draw.rectangle(image_box, fill=IMAGE_BACKGROUND)
        sheet.paste(image, (left + b + (layout.tile - image.width) // 2,
                            top + b + (layout.tile - image.height) // 2))
    _text(draw, (left + b + 3, text_top + 2), caption, font, layout.tile - 6)


def _text(draw, origin: tuple[int, int], lines: list[str], font, width: int) -> None:
    x, y = origin
    for line in lines:
        while line and draw.textlength(line, font=font) > width:
            line = line[:-1]
        draw.text((x, y), line, fill=TEXT_COLOUR, font=font)
        y += int(font.size * 1.25) if hasattr(font, "size") else 14


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()
