"""Reading the English and Spanish Bibles offline, verse by verse, from Debian's SWORD modules.

The modules ``engKJV2006eb`` (King James Version) and ``spaRV1909eb`` (Reina-Valera 1909), both public domain,
come with the Debian packages ``sword-text-kjv`` and ``sword-text-sparv``. Both use the KJV versification
(:mod:`examples.common.versification`), so verse *i* of one module aligns with verse *i* of the other, with one
exception: in a few chapters (Numbers 13 and 30, 1 Samuel 24, Job 39 to 41, Hosea 12, Jonah 2; 183 verses) the
Reina-Valera module keeps its own verse division, so its text there runs one to five verses ahead of the KJV's
(its Jonah 2:1 is the KJV's Jonah 1:17), and 18 of its KJV verse slots are empty. The book is right everywhere.

- :func:`read_verses` gives the verses of one module with their book (name, OSIS identifier, index in the
  canonical order, genre), chapter and verse number: the input of a classification by book or genre;
- :func:`verse_pairs` gives the aligned (English, Spanish) verse texts: the input of the translation example.

The zText format, per testament (``ot``, ``nt``):

- ``.bzs``: the block index, three little-endian u32 per block: offset into ``.bzz``, compressed size,
  uncompressed size;
- ``.bzv``: the verse index, 10 bytes per slot: u32 block number, u32 offset in the uncompressed block,
  u16 size (0 means an empty slot);
- ``.bzz``: the concatenated zlib-compressed blocks.

The verse index of a testament holds a slot for the module's heading, one for the testament's, and then, book
by book in canonical order, a slot for the book's heading followed, chapter by chapter, by a slot for the
chapter's heading and one per verse. The headings carry only markup; the reader skips them.

Only the standard library is used.
"""

from __future__ import annotations

import html
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from examples.common import DataUnavailableError
from examples.common.versification import BOOKS, Book

__all__ = [
    "SWORD_ROOT",
    "ENGLISH",
    "SPANISH",
    "Verse",
    "read_verses",
    "verse_pairs",
    "read_testament",
    "clean_verse",
]

SWORD_ROOT = Path("/usr/share/sword/modules/texts/ztext")
ENGLISH = "engKJV2006eb"
SPANISH = "spaRV1909eb"

_DROP_ELEMENTS = re.compile(r"<(note|title)\b[^>]*>.*?</\1>", re.S | re.I)
_TAG = re.compile(r"<[^>]+>")
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Verse:
    """One verse of a module.

    Attributes:
        book: its :class:`~examples.common.versification.Book` (``book.name``, ``book.index`` in the canonical
            order 0-65, ``book.osis``, ``book.genre``).
        chapter: the chapter number, from 1.
        verse: the verse number within the chapter, from 1.
        text: the text, markup stripped (``""`` where the module has none).
    """

    book: Book
    chapter: int
    verse: int
    text: str

    @property
    def reference(self) -> str:
        """``"Genesis 1:1"``."""
        return f"{self.book.name} {self.chapter}:{self.verse}"


def clean_verse(raw: str) -> str:
    """Strip the markup of a verse: notes and titles entirely, other tags, entities, pilcrows."""
    text = _DROP_ELEMENTS.sub(" ", raw)
    text = _TAG.sub("", text)
    text = html.unescape(text).replace("\u00b6", " ")
    return _SPACE.sub(" ", text).strip()


def read_testament(module_dir: Path, testament: str) -> list[str]:
    """Every slot of one testament (``"ot"`` or ``"nt"``) of a zText module, headings included, markup stripped."""
    bzs = (module_dir / f"{testament}.bzs").read_bytes()
    bzv = (module_dir / f"{testament}.bzv").read_bytes()
    bzz = (module_dir / f"{testament}.bzz").read_bytes()
    blocks: list[bytes | None] = [None] * (len(bzs) // 12)

    def block(i: int) -> bytes:
        if blocks[i] is None:
            offset, size, _ = struct.unpack_from("<III", bzs, 12 * i)
            blocks[i] = zlib.decompress(bzz[offset : offset + size])
        return blocks[i]  # type: ignore[return-value]

    slots = []
    for entry in range(len(bzv) // 10):
        block_no, offset, size = struct.unpack_from("<IIH", bzv, 10 * entry)
        if size == 0:
            slots.append("")
            continue
        raw = block(block_no)[offset : offset + size].decode("utf-8", errors="replace")
        slots.append(clean_verse(raw))
    return slots


def _slot_layout(testament: str) -> list[tuple[Book, int, int] | None]:
    """What each slot of a testament's verse index holds: ``(book, chapter, verse)``, or None for a heading."""
    layout: list[tuple[Book, int, int] | None] = [None, None]  # the module's and the testament's headings
    for book in BOOKS:
        if book.testament != testament:
            continue
        layout.append(None)  # the book's heading
        for chapter, count in enumerate(book.verses, start=1):
            layout.append(None)  # the chapter's heading
            layout += [(book, chapter, verse) for verse in range(1, count + 1)]
    return layout


def read_verses(module: str = ENGLISH, root: Path | str = SWORD_ROOT, keep_empty: bool = False) -> list[Verse]:
    """The verses of a module in canonical order, each with its book, chapter and verse number.

    Args:
        module: the module's name, :data:`ENGLISH` (``"engKJV2006eb"``) or :data:`SPANISH` (``"spaRV1909eb"``),
            or another zText module in the KJV versification.
        root: the directory that holds the module's directory.
        keep_empty: keep the verses the module leaves empty (with text ``""``), so that the list has one entry
            per verse of the versification (31,102) and aligns with any other module's.

    Returns:
        The verses (31,102 in the KJV module, all non-empty; 31,084 non-empty in the Reina-Valera 1909).

    Raises:
        DataUnavailableError: the module is not installed (the message gives the ``apt-get`` command).
        ValueError: the module's verse index does not have the KJV versification's slots.
    """
    module_dir = Path(root) / module
    if not module_dir.is_dir():
        raise DataUnavailableError(
            f"SWORD module {module!r} not found under {root}. On Debian, install it with: "
            "apt-get install -y --no-install-recommends sword-text-kjv sword-text-sparv"
        )
    verses = []
    for testament in ("ot", "nt"):
        slots, layout = read_testament(module_dir, testament), _slot_layout(testament)
        if len(slots) != len(layout):
            raise ValueError(
                f"{module_dir}: the {testament} verse index has {len(slots)} slots, the KJV versification "
                f"{len(layout)}; only modules in the KJV versification are supported"
            )
        for text, place in zip(slots, layout):
            if place is not None and (text or keep_empty):
                verses.append(Verse(*place, text))
    return verses


def verse_pairs(root: Path | str = SWORD_ROOT) -> list[tuple[str, str]]:
    """The aligned (English, Spanish) verse texts where both sides are non-empty (31,084 pairs)."""
    english = read_verses(ENGLISH, root, keep_empty=True)
    spanish = read_verses(SPANISH, root, keep_empty=True)
    return [(e.text, s.text) for e, s in zip(english, spanish) if e.text and s.text]


if __name__ == "__main__":
    for v in read_verses()[:2] + read_verses(SPANISH)[-2:]:
        print(f"{v.reference} ({v.book.genre}): {v.text}")
    print(len(verse_pairs()), "aligned pairs")
