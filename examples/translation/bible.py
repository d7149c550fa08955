"""Reading the English-Spanish Bible verse pairs offline, from Debian's SWORD modules.

The modules ``engKJV2006eb`` (King James Version) and ``spaRV1909eb`` (Reina-Valera 1909), both public
domain, come with the Debian packages ``sword-text-kjv`` and ``sword-text-sparv``. Both use the KJV
versification, so verse *i* of one module aligns with verse *i* of the other.

The zText format, per testament (``ot``, ``nt``):

- ``.bzs``: the block index, three little-endian u32 per block: offset into ``.bzz``, compressed size,
  uncompressed size;
- ``.bzv``: the verse index, 10 bytes per verse: u32 block number, u32 offset in the uncompressed block,
  u16 size (0 means an empty verse);
- ``.bzz``: the concatenated zlib-compressed blocks.

Only the standard library is used.
"""

from __future__ import annotations

import html
import re
import struct
import zlib
from pathlib import Path

SWORD_ROOT = Path("/usr/share/sword/modules/texts/ztext")
ENGLISH = "engKJV2006eb"
SPANISH = "spaRV1909eb"

_DROP_ELEMENTS = re.compile(r"<(note|title)\b[^>]*>.*?</\1>", re.S | re.I)
_TAG = re.compile(r"<[^>]+>")
_SPACE = re.compile(r"\s+")


def clean_verse(raw: str) -> str:
    """Strip the markup of a verse: notes and titles entirely, other tags, entities, pilcrows."""
    text = _DROP_ELEMENTS.sub(" ", raw)
    text = _TAG.sub("", text)
    text = html.unescape(text).replace("\u00b6", " ")
    return _SPACE.sub(" ", text).strip()


def read_testament(module_dir: Path, testament: str) -> list[str]:
    """All verses of one testament (``"ot"`` or ``"nt"``) of a zText module, markup stripped."""
    bzs = (module_dir / f"{testament}.bzs").read_bytes()
    bzv = (module_dir / f"{testament}.bzv").read_bytes()
    bzz = (module_dir / f"{testament}.bzz").read_bytes()
    blocks: list[bytes | None] = [None] * (len(bzs) // 12)

    def block(i: int) -> bytes:
        if blocks[i] is None:
            offset, size, _ = struct.unpack_from("<III", bzs, 12 * i)
            blocks[i] = zlib.decompress(bzz[offset : offset + size])
        return blocks[i]  # type: ignore[return-value]

    verses = []
    for entry in range(len(bzv) // 10):
        block_no, offset, size = struct.unpack_from("<IIH", bzv, 10 * entry)
        if size == 0:
            verses.append("")
            continue
        raw = block(block_no)[offset : offset + size].decode("utf-8", errors="replace")
        verses.append(clean_verse(raw))
    return verses


def read_module(name: str, root: Path = SWORD_ROOT) -> list[str]:
    """Every verse slot of a module (Old then New Testament), ``""`` where a verse is empty."""
    module_dir = Path(root) / name
    if not module_dir.is_dir():
        raise FileNotFoundError(
            f"SWORD module {name!r} not found under {root}. On Debian, install it with: "
            "apt-get install -y --no-install-recommends sword-text-kjv sword-text-sparv"
        )
    return read_testament(module_dir, "ot") + read_testament(module_dir, "nt")


def verse_pairs(root: Path = SWORD_ROOT) -> list[tuple[str, str]]:
    """The aligned (English, Spanish) verse pairs where both sides are non-empty."""
    english, spanish = read_module(ENGLISH, root), read_module(SPANISH, root)
    if len(english) != len(spanish):
        raise ValueError(f"the modules are not aligned: {len(english)} vs {len(spanish)} verse slots")
    return [(e, s) for e, s in zip(english, spanish) if e and s]


if __name__ == "__main__":
    pairs = verse_pairs()
    print(len(pairs), "pairs")
    for e, s in pairs[:3] + pairs[-2:]:
        print("EN:", e)
        print("ES:", s)
