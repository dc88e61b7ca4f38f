"""Jane Austen's six novels, an offline English corpus, from Debian's ``r-cran-janeaustenr`` package.

The package is fetched with ``apt-get download`` (R is not needed) and unpacked with ``dpkg-deb``. Its
data sit in an R lazy-load database: ``Rdata.rdx`` (a gzip-compressed R serialisation of an index
mapping object names to byte ranges) and ``Rdata.rdb`` (one record per object: a 4-byte big-endian
inflated length, then zlib data holding the object's R serialisation). The novels are cached as UTF-8
text files, so later calls need neither apt nor the parser.
"""

from __future__ import annotations

import gzip
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

from mixerdistill.cache import cache_dir, publish_dir
from mixerdistill.errors import UserError

PACKAGE = "r-cran-janeaustenr"
# R object name -> title, in the book order of the R package's `austen_books()`.
NOVELS = {
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
_DATA_DIR = Path("usr/lib/R/site-library/janeaustenr/data")
_FALLBACK = "Alternatively, point the recipe's data at local text files: `data: {source: text, paths: [...]}`."


def austen_novels() -> dict[str, str]:
    """Title -> full text (the R package's lines joined with "\\n"), in book order.

    The first call fetches and caches the corpus; later calls read the cache.
    """
    entry = _cached_entry() or _fetch_and_cache()
    return {title: (entry / f"{name}.txt").read_bytes().decode("utf-8") for name, title in NOVELS.items()}


def _cached_entry() -> Path | None:
    """The cached corpus, if any (the last by name if several package versions were cached)."""
    entries = sorted(cache_dir("corpora").glob("janeaustenr-*"))
    return entries[-1] if entries else None


def _fetch_and_cache() -> Path:
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise UserError(
                f"The Jane Austen corpus is fetched with `{tool}`, which is not on this "
                f"machine (it needs a Debian-based system). {_FALLBACK}"
            )
    with tempfile.TemporaryDirectory(prefix="mixerdistill-austen-") as tmp:
        folder = Path(tmp)
        deb = _download_deb(folder)
        version = _run(["dpkg-deb", "--field", str(deb), "Version"]).strip()
        entry = cache_dir("corpora") / f"janeaustenr-{version}"
        print(f"Extracting Jane Austen's novels ({PACKAGE} {version}) into {entry}", file=sys.stderr)
        _run(["dpkg-deb", "-x", str(deb), str(folder / "root")])
        data = folder / "root" / _DATA_DIR
        objects = read_rdata(data / "Rdata.rdx", data / "Rdata.rdb")
        missing = sorted(set(NOVELS) - set(objects))
        if missing:
            raise UserError(f"{deb.name} lacks the novels {missing}. {_FALLBACK}")
        with publish_dir(entry) as out:
            for name in NOVELS:
                text = "\n".join(line or "" for line in objects[name])  # NA lines become empty
                (out / f"{name}.txt").write_bytes(text.encode("utf-8"))
    return entry


def _download_deb(folder: Path) -> Path:
    """`apt-get download` the package into ``folder``, running `apt-get update` once if apt does
    not know the package yet."""

    def download() -> subprocess.CompletedProcess:
        return subprocess.run(["apt-get", "download", PACKAGE], cwd=folder, capture_output=True, text=True)

    proc = download()
    if proc.returncode != 0 and ("Unable to locate package" in proc.stderr or "candidate" in proc.stderr):
        _run(["apt-get", "update"])
        proc = download()
    if proc.returncode != 0:
        raise UserError(f"`apt-get download {PACKAGE}` failed:\n{proc.stderr.strip()}\n{_FALLBACK}")
    return next(folder.glob("*.deb"))


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"`{' '.join(cmd)}` failed:\n{proc.stderr.strip()}\n{_FALLBACK}")
    return proc.stdout


# -- R lazy-load databases and R serialisation ----------------------------------------------------


def read_rdata(rdx: Path, rdb: Path) -> dict[str, object]:
    """Every object of an R lazy-load database (``.rdx`` index + ``.rdb`` records), by name."""
    index = r_unserialize(gzip.decompress(rdx.read_bytes()))
    if index["compressed"] != [True]:
        raise ValueError(
            f"{rdb}: only zlib-compressed records are supported, not compression type {index['compressed']}"
        )
    blob = rdb.read_bytes()
    return {
        name: r_unserialize(inflate_record(blob[start : start + length]))
        for name, (start, length) in index["variables"].items()
    }


def inflate_record(record: bytes) -> bytes:
    """One ``.rdb`` record: a 4-byte big-endian inflated length, then zlib data."""
    (size,) = struct.unpack(">I", record[:4])
    data = zlib.decompress(record[4:])
    if len(data) != size:
        raise ValueError(f"R record inflated to {len(data)} bytes, its header says {size}")
    return data


# SEXP types and pseudo-types of the R serialisation format.
_SYMSXP, _LISTSXP, _CHARSXP, _LGLSXP, _INTSXP, _STRSXP, _VECSXP = 1, 2, 9, 10, 13, 16, 19
_REFSXP, _NILVALUE_SXP = 255, 254
_NA_INT = -(2**31)
# CHARSXP encoding bits (in the "levels" field, flags >> 12).
_LATIN1, _UTF8, _ASCII = 1 << 2, 1 << 3, 1 << 6


def r_unserialize(data: bytes) -> object:
    """Decode an R serialisation in XDR format (``X\\n``, versions 2 and 3).

    Supports what R data files of character vectors need: NULL -> None; character, integer and
    logical vectors -> lists (NA -> None); lists -> lists; pairlists -> dicts by tag; symbols -> str.
    A vector or list with a ``names`` attribute becomes a dict; other attributes are dropped.
    """
    return _RReader(data).read()


class _RReader:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0
        self.refs: list[object] = []
        self.encoding = "utf-8"

    def read_int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def read_bytes(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("truncated R serialisation")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def read(self) -> object:
        if self.read_bytes(2) != b"X\n":
            raise ValueError("not an R serialisation in XDR format")
        version = self.read_int()
        self.pos += 8  # the writer's R version and the oldest R version that can read it
        if version == 3:
            self.encoding = self.read_bytes(self.read_int()).decode("ascii")
        elif version != 2:
            raise ValueError(f"unsupported R serialisation version {version}")
        return self.item()

    def item(self) -> object:
        flags = self.read_int()
        kind, levels = flags & 0xFF, flags >> 12
        has_attr, has_tag = flags & (1 << 9), flags & (1 << 10)
        if kind == _NILVALUE_SXP:
            return None
        if kind == _REFSXP:
            index = flags >> 8 or self.read_int()
            return self.refs[index - 1]
        if kind == _SYMSXP:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == _LISTSXP:
            attrs = self.item() if has_attr else None
            tag = self.item() if has_tag else None
            pairs = {tag: self.item()}
            rest = self.item()  # the CDR: the next cell, or None at the end
            pairs.update(rest or {})
            return _named(pairs, attrs)
        if kind == _CHARSXP:
            return self.charsxp(levels)
        if kind in (_LGLSXP, _INTSXP):
            n = self.read_int()
            values = struct.unpack_from(f">{n}i", self.read_bytes(4 * n))
            convert = bool if kind == _LGLSXP else int
            out = [None if v == _NA_INT else convert(v) for v in values]
        elif kind in (_STRSXP, _VECSXP):
            out = [self.item() for _ in range(self.read_int())]
        else:
            raise ValueError(f"unsupported R object type {kind} at byte {self.pos - 4}")
        return _named(out, self.item() if has_attr else None)

    def charsxp(self, levels: int) -> str | None:
        n = self.read_int()
        if n == -1:
            return None
        if levels & _LATIN1:
            encoding = "latin-1"
        elif levels & (_UTF8 | _ASCII):
            encoding = "utf-8"
        else:
            encoding = self.encoding
        return self.read_bytes(n).decode(encoding)


def _named(value, attrs: dict | None):
    names = (attrs or {}).get("names")
    if names is None or isinstance(value, dict):
        return value
    return dict(zip(names, value))
