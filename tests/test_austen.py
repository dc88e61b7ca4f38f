import gzip
import shutil
import struct
import zlib

import pytest

from mixerdistill import austen
from mixerdistill.austen import NOVELS, austen_novels, inflate_record, r_unserialize, read_rdata
from mixerdistill.errors import UserError

# -- a tiny writer of R's XDR serialisation, enough for the records the parser must read -----------


def i32(*values: int) -> bytes:
    return struct.pack(f">{len(values)}i", *values)


HEADER = b"X\n" + i32(3, 0x040201, 0x030500, 5) + b"UTF-8"
NIL = i32(254)
ASCII, LATIN1, UTF8 = 64 << 12, 4 << 12, 8 << 12


def charsxp(text: str | None, encoding: str = "utf-8", levels: int = UTF8) -> bytes:
    if text is None:
        return i32(9, -1)
    raw = text.encode(encoding)
    return i32(levels | 9, len(raw)) + raw


def strsxp(*items: bytes, attrs: bytes = b"") -> bytes:
    return i32(16 | (0x200 if attrs else 0), len(items)) + b"".join(items) + attrs


def names_attr(*names: str, first_use: bool = True) -> bytes:
    """Attribute pairlist `names = c(...)`: the symbol is written once, then referenced."""
    symbol = i32(1) + charsxp("names", levels=ASCII) if first_use else i32((1 << 8) | 255)
    return i32(0x402) + symbol + strsxp(*(charsxp(n, levels=ASCII) for n in names)) + NIL


def record(payload: bytes) -> bytes:
    return i32(len(payload)) + zlib.compress(payload)


# -- parser ----------------------------------------------------------------------------------------


def test_unserialize_character_vector_with_na_and_non_ascii():
    data = HEADER + strsxp(
        charsxp("It is a truth", levels=ASCII),
        charsxp(None),
        charsxp("£5 à Café", levels=UTF8),
        charsxp("naïve", encoding="latin-1", levels=LATIN1),
        charsxp("Bingley’s", levels=0),  # no encoding bit: the header's native encoding (UTF-8)
    )
    assert r_unserialize(data) == ["It is a truth", None, "£5 à Café", "naïve", "Bingley’s"]


def test_read_rdata_uses_the_index_to_name_objects(tmp_path):
    first = record(HEADER + strsxp(charsxp("EMMA"), charsxp("")))
    second = record(HEADER + strsxp(charsxp("Persuasion")))
    ranges = [i32(13, 2, 0, len(first)), i32(13, 2, len(first), len(second))]
    variables = i32(0x213, 2) + b"".join(ranges) + names_attr("emma", "persuasion")
    references = i32(0x213, 0) + names_attr(first_use=False)
    compressed = i32(10, 1, 1)
    index = (
        HEADER
        + i32(0x213, 3)
        + variables
        + references
        + compressed
        + names_attr("variables", "references", "compressed", first_use=False)
    )
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(index))
    (tmp_path / "Rdata.rdb").write_bytes(first + second)
    objects = read_rdata(tmp_path / "Rdata.rdx", tmp_path / "Rdata.rdb")
    assert objects == {"emma": ["EMMA", ""], "persuasion": ["Persuasion"]}


def test_malformed_input_is_rejected():
    with pytest.raises(ValueError, match="XDR"):
        r_unserialize(b"A\n" + HEADER[2:] + NIL)
    with pytest.raises(ValueError, match="header says"):
        inflate_record(i32(99) + zlib.compress(b"short"))
    with pytest.raises(ValueError, match="unsupported R object type"):
        r_unserialize(HEADER + i32(3))  # a closure


# -- fetching --------------------------------------------------------------------------------------


def test_missing_apt_is_a_user_error_pointing_at_local_text(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXERDISTILL_CACHE", str(tmp_path))
    monkeypatch.setattr(austen.shutil, "which", lambda tool: None)
    with pytest.raises(UserError, match=r"apt-get.*source: text"):
        austen_novels()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt-get (Debian)")
def test_real_corpus_is_fetched_once_and_then_read_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXERDISTILL_CACHE", str(tmp_path))
    novels = austen_novels()
    assert list(novels) == list(NOVELS.values())
    assert abs(sum(map(len, novels.values())) - 4.03e6) < 0.01 * 4.03e6
    assert novels["Persuasion"].startswith("Persuasion\n")
    assert "It is a truth universally acknowledged" in novels["Pride and Prejudice"][:1000]
    assert "Emma Woodhouse, handsome, clever, and rich" in novels["Emma"][:1000]

    def no_subprocess(*args, **kwargs):
        raise AssertionError("the cached corpus must not run apt")

    monkeypatch.setattr(austen.subprocess, "run", no_subprocess)
    assert austen_novels() == novels
