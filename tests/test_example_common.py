"""What the examples share (``examples.common``): the IDX reader and the Fashion-MNIST loader, the small CNNs, and
the SWORD Bible reader with the KJV versification, on files the tests write (and on the installed modules where
Debian's packages are present)."""

from __future__ import annotations

import gzip
import re
import struct
import zlib
from pathlib import Path

import pytest
import torch

from examples.common import DataUnavailableError, bible, fashion_mnist
from examples.common.cnn import SmallCNN, ThreeConvCNN
from examples.common.versification import BOOKS, GENRES, OLD_TESTAMENT_BOOKS


# ---------------------------------------------------------------------------------------------------------------
# IDX files and Fashion-MNIST
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".gz", ""])
def test_idx_round_trip(tmp_path, suffix):
    t = torch.randint(0, 256, (5, 7, 3), dtype=torch.uint8)
    path = tmp_path / f"x-idx3-ubyte{suffix}"
    fashion_mnist.write_idx(path, t)
    assert torch.equal(fashion_mnist.read_idx(path), t)


def test_idx_reader_against_hand_written_bytes(tmp_path):
    # magic 0x00000803 (uint8, 3 dims), dims 2 x 1 x 3, then 6 bytes: the format spelled out by hand
    raw = bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 3, 1, 2, 3, 4, 5, 6])
    (tmp_path / "a").write_bytes(raw)
    assert fashion_mnist.read_idx(tmp_path / "a").tolist() == [[[1, 2, 3]], [[4, 5, 6]]]
    # a big-endian int32 file: value 258 = 0x00000102
    (tmp_path / "b").write_bytes(bytes([0, 0, 0x0C, 1, 0, 0, 0, 1, 0, 0, 1, 2]))
    assert fashion_mnist.read_idx(tmp_path / "b").tolist() == [258]
    # gzip is recognised by its content, whatever the name
    with gzip.open(tmp_path / "c", "wb") as f:
        f.write(struct.pack(">HBB", 0, 0x08, 3) + struct.pack(">3I", 2, 3, 4) + bytes(range(24)))
    assert fashion_mnist.read_idx(tmp_path / "c").flatten().tolist() == list(range(24))


def test_idx_reader_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="not an IDX file"):
        fashion_mnist.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 4, 1, 2]))
    with pytest.raises(ValueError, match="header says 4 data bytes"):
        fashion_mnist.read_idx(tmp_path / "short")
    (tmp_path / "type").write_bytes(bytes([0, 0, 0x42, 1, 0, 0, 0, 1, 7]))
    with pytest.raises(ValueError, match="unknown IDX data type 0x42"):
        fashion_mnist.read_idx(tmp_path / "type")
    with pytest.raises(TypeError, match="uint8"):
        fashion_mnist.write_idx(tmp_path / "f", torch.zeros(2))


def test_fashion_mnist_from_a_directory(tmp_path):
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 12), ("t10k", 5)):
        images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        labels = torch.arange(n, dtype=torch.uint8) % 10
        fashion_mnist.write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", images)
        fashion_mnist.write_idx(tmp_path / f"{split}-labels-idx1-ubyte", labels)  # one of them not compressed
    train, test = fashion_mnist.load_fashion_mnist(tmp_path)
    assert train.images.shape == (12, 1, 28, 28) and train.images.dtype == torch.uint8
    assert test.labels.tolist() == [0, 1, 2, 3, 4] and test.labels.dtype == torch.int64
    assert train.source == str(tmp_path)
    assert torch.equal(train.images[:, 0], fashion_mnist.read_idx(tmp_path / "train-images-idx3-ubyte.gz"))


def test_missing_fashion_mnist_gives_install_hint(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    with pytest.raises(DataUnavailableError, match="apt-get install -y --no-install-recommends dataset-fashion-mnist"):
        fashion_mnist.load_fashion_mnist(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------------------------
# The small CNNs
# ---------------------------------------------------------------------------------------------------------------
def test_small_cnn_is_delegator_ready():
    from pycoe.twostage.delegator import Delegator

    d = Delegator(SmallCNN(10, 0.25), num_experts=3, num_classes=10)
    out = d(torch.randn(2, 1, 28, 28))
    assert out.selection_logits.shape == (2, 3) and out.rough_logits.shape == (2, 10)
    convs = [m for m in SmallCNN(10, 1.0).modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 32, 64, 64] and [c.stride[0] for c in convs] == [1, 2, 1, 2, 1]
    with pytest.raises(ValueError, match="width"):
        SmallCNN(10, 0.0)


def test_three_conv_cnn_shapes_and_division():
    from pycoe.cotrain.width import count_parameters, divide_by_factory

    net = ThreeConvCNN(8)
    assert net(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size[0], c.stride[0]) for c in convs] == [(8, 5, 2), (16, 3, 1), (32, 3, 1)]
    halves = divide_by_factory(ThreeConvCNN, 2, base_width=32, integer=True)
    assert len(halves) == 2 and halves[0].features[0].out_channels < 32
    assert abs(2 * count_parameters(halves[0]) / count_parameters(ThreeConvCNN(32)) - 1) < 0.2


# ---------------------------------------------------------------------------------------------------------------
# The KJV versification and the SWORD reader
# ---------------------------------------------------------------------------------------------------------------
def test_versification_is_the_kjv():
    assert len(BOOKS) == 66 and OLD_TESTAMENT_BOOKS == 39
    assert [b.index for b in BOOKS] == list(range(66))
    ot, nt = BOOKS[:39], BOOKS[39:]
    assert (sum(len(b.verses) for b in ot), sum(sum(b.verses) for b in ot)) == (929, 23145)
    assert (sum(len(b.verses) for b in nt), sum(sum(b.verses) for b in nt)) == (260, 7957)
    by_osis = {b.osis: b for b in BOOKS}
    assert by_osis["Gen"].verses[0] == 31 and len(by_osis["Gen"].verses) == 50
    assert by_osis["Ps"].verses[118] == 176 and by_osis["Ps"].verses[116] == 2 and len(by_osis["Ps"].verses) == 150
    assert by_osis["3John"].verses == (14,) and by_osis["Rev"].verses[-1] == 21
    assert (BOOKS[0].name, BOOKS[39].name, BOOKS[-1].name) == ("Genesis", "Matthew", "Revelation")
    assert BOOKS[38].testament == "ot" and BOOKS[39].testament == "nt"


def test_genres_follow_the_sections_of_the_canon():
    genre = {b.osis: b.genre for b in BOOKS}
    sections = [
        ("law", "Gen", "Deut"),
        ("history", "Josh", "Esth"),
        ("poetry/wisdom", "Job", "Song"),
        ("prophets", "Isa", "Mal"),
        ("gospels/acts", "Matt", "Acts"),
        ("letters", "Rom", "Jude"),
        ("apocalyptic", "Rev", "Rev"),
    ]
    order = [b.osis for b in BOOKS]
    covered = []
    for name, first, last in sections:
        books = order[order.index(first) : order.index(last) + 1]
        assert {genre[b] for b in books} == {name}, name
        covered += books
    assert covered == order and [s[0] for s in sections] == list(GENRES)
    assert [len(order[order.index(f) : order.index(la) + 1]) for _, f, la in sections] == [5, 12, 5, 17, 5, 21, 1]


def _layout(testament: str) -> list[tuple[str, str, int, int]]:
    """Every slot of a testament in the KJV versification: ("module" | "testament" | "book" | "chapter" |
    "verse", osis, chapter, verse)."""
    slots = [("module", "", 0, 0), ("testament", "", 0, 0)]
    for book in BOOKS:
        if book.testament == testament:
            slots.append(("book", book.osis, 0, 0))
            for c, n in enumerate(book.verses, start=1):
                slots.append(("chapter", book.osis, c, 0))
                slots += [("verse", book.osis, c, v) for v in range(1, n + 1)]
    return slots


def _write_ztext(module_dir: Path, testament: str, texts: list[str], per_block: int = 500) -> None:
    """Write slot texts in the zText layout: zlib blocks (.bzz), block index (.bzs), verse index (.bzv)."""
    bzs, bzv, bzz = bytearray(), bytearray(), bytearray()
    for b in range(0, len(texts), per_block):
        raw = bytearray()
        for text in texts[b : b + per_block]:
            data = text.encode("utf-8")
            bzv += struct.pack("<IIH", b // per_block, len(raw), len(data))
            raw += data
        comp = zlib.compress(bytes(raw))
        bzs += struct.pack("<III", len(bzz), len(comp), len(raw))
        bzz += comp
    module_dir.mkdir(parents=True, exist_ok=True)
    (module_dir / f"{testament}.bzs").write_bytes(bytes(bzs))
    (module_dir / f"{testament}.bzv").write_bytes(bytes(bzv))
    (module_dir / f"{testament}.bzz").write_bytes(bytes(bzz))


MARKUP = {  # verse -> (raw text in the English module, what the reader must give)
    ("Gen", 1, 1): (
        'In the <w lemma="strong:H1">beginning</w>.<note placement="foot">a note</note>',
        "In the beginning.",
    ),
    ("Gen", 1, 3): ("Light &amp; dark\u00b6", "Light & dark"),
    ("Ps", 3, 1): ("<title>A Psalm of David</title>LORD, how are they increased", "LORD, how are they increased"),
}
EMPTY = {"engKJV2006eb": ("Gen", 1, 2), "spaRV1909eb": ("Rev", 22, 21)}


def _write_module(root: Path, name: str, lang: str) -> None:
    """A module in the KJV versification whose verse texts name their place ("en Ps 119:176"); headings carry
    OSIS markup only, as Debian's modules do."""
    for testament in ("ot", "nt"):
        texts = []
        for kind, osis, c, v in _layout(testament):
            if kind == "book":
                texts.append(f'<div osisID="{osis}" type="book"/>')
            elif kind == "chapter":
                texts.append(f'<chapter n="{c}" osisID="{osis}.{c}" sID="{osis}.{c}"/> ')
            elif kind == "verse":
                text = f"{lang} {osis} {c}:{v}"
                if lang == "en" and (osis, c, v) in MARKUP:
                    text = MARKUP[(osis, c, v)][0]
                texts.append("" if EMPTY[name] == (osis, c, v) else text)
            else:
                texts.append("")
        _write_ztext(root / name, testament, texts)


@pytest.fixture(scope="module")
def sword_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("sword")
    _write_module(root, bible.ENGLISH, "en")
    _write_module(root, bible.SPANISH, "es")
    return root


def test_verses_carry_their_book_chapter_and_number(sword_root):
    verses = bible.read_verses(bible.ENGLISH, sword_root)
    assert len(verses) == 31102 - 1  # one empty verse dropped
    first, last = verses[0], verses[-1]
    assert (first.book.name, first.book.index, first.chapter, first.verse) == ("Genesis", 0, 1, 1)
    assert first.text == "In the beginning." and first.book.genre == "law"
    assert (last.reference, last.book.index, last.book.genre) == ("Revelation 22:21", 65, "apocalyptic")
    for v in verses:  # every verse landed on its own place, across every book and chapter boundary
        if (v.book.osis, v.chapter, v.verse) not in MARKUP:
            assert v.text == f"en {v.book.osis} {v.chapter}:{v.verse}"
    assert [v.text for v in verses if (v.book.osis, v.chapter, v.verse) in MARKUP] == [
        want for _, want in MARKUP.values()
    ]
    matthew = next(v for v in verses if v.book.osis == "Matt")
    assert (matthew.book.index, matthew.book.testament, matthew.chapter, matthew.verse) == (39, "nt", 1, 1)
    spanish = bible.read_verses(bible.SPANISH, sword_root)
    assert spanish[0].text == "es Gen 1:1" and spanish[-1].reference == "Revelation 22:20"


def test_keep_empty_aligns_the_modules(sword_root):
    english = bible.read_verses(bible.ENGLISH, sword_root, keep_empty=True)
    spanish = bible.read_verses(bible.SPANISH, sword_root, keep_empty=True)
    assert len(english) == len(spanish) == 31102
    assert [(v.book, v.chapter, v.verse) for v in english] == [(v.book, v.chapter, v.verse) for v in spanish]
    assert english[1].text == "" and english[1].reference == "Genesis 1:2"
    counts = {g: sum(v.book.genre == g for v in english) for g in GENRES}
    assert counts == {g: sum(sum(b.verses) for b in BOOKS if b.genre == g) for g in GENRES}


def test_verse_pairs_drop_a_verse_empty_on_either_side(sword_root):
    pairs = bible.verse_pairs(sword_root)
    assert len(pairs) == 31102 - 2
    assert pairs[0] == ("In the beginning.", "es Gen 1:1")
    assert pairs[1] == ("Light & dark", "es Gen 1:3")  # Genesis 1:2 is empty in English
    assert pairs[-1] == ("en Rev 22:20", "es Rev 22:20")  # Revelation 22:21 is empty in Spanish


def test_a_module_in_another_versification_is_refused(tmp_path):
    _write_ztext(tmp_path / "other", "ot", ["", "", "In the beginning."])
    _write_ztext(tmp_path / "other", "nt", ["", ""])
    with pytest.raises(ValueError, match="ot verse index has 3 slots, the KJV versification 24115"):
        bible.read_verses("other", tmp_path)


def test_missing_module_says_what_to_install(tmp_path):
    with pytest.raises(DataUnavailableError, match="sword-text-kjv"):
        bible.read_verses(bible.ENGLISH, tmp_path)
    with pytest.raises(FileNotFoundError):  # DataUnavailableError is a FileNotFoundError
        bible.verse_pairs(tmp_path)


INSTALLED = (bible.SWORD_ROOT / bible.ENGLISH).is_dir() and (bible.SWORD_ROOT / bible.SPANISH).is_dir()


@pytest.mark.skipif(not INSTALLED, reason="Debian's sword-text-kjv and sword-text-sparv are not installed")
@pytest.mark.parametrize("module", [bible.ENGLISH, bible.SPANISH])
def test_installed_modules_match_the_versification(module):
    """The OSIS markers in the modules' heading slots (``<div osisID="Gen" ... type="book"/>``, ``<chapter
    osisID="Gen.1" .../>``), read without the reader, sit exactly where the versification puts the headings."""
    module_dir = bible.SWORD_ROOT / module
    for testament in ("ot", "nt"):
        bzs, bzv, bzz = ((module_dir / f"{testament}.{ext}").read_bytes() for ext in ("bzs", "bzv", "bzz"))
        blocks = {}
        raw = []
        for i in range(len(bzv) // 10):
            block, offset, size = struct.unpack_from("<IIH", bzv, 10 * i)
            if block not in blocks:
                start, length, _ = struct.unpack_from("<III", bzs, 12 * block)
                blocks[block] = zlib.decompress(bzz[start : start + length])
            raw.append(blocks[block][offset : offset + size].decode("utf-8"))
        layout = _layout(testament)
        assert len(raw) == len(layout)
        for text, (kind, osis, c, _) in zip(raw, layout):
            if kind == "book":
                assert re.search(rf'osisID="{osis}"[^>]*type="book"', text), (osis, text[:80])
            elif kind == "chapter":
                assert f'osisID="{osis}.{c}"' in text, (osis, c, text[:80])
    verses = bible.read_verses(module)
    assert len(verses) == (31102 if module == bible.ENGLISH else 31084)
    assert verses[0].text.startswith("In the beginning God" if module == bible.ENGLISH else "EN el principio")
