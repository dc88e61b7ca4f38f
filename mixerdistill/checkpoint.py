"""Stage checkpoints: ``model.safetensors`` + ``student.json`` + a ``manifest.json`` of checksums.

A checkpoint is written into a temporary sibling folder, fsynced, then renamed into place, so a
folder with a valid manifest is always complete; anything else is never loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from mixerdistill.errors import UserError
from mixerdistill.student import StudentSpec

MODEL_FILE = "model.safetensors"
SPEC_FILE = "student.json"
MANIFEST_FILE = "manifest.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a fsynced temporary file and a rename."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def save_checkpoint(model: nn.Module, spec: StudentSpec, directory: Path, extra: dict | None = None) -> None:
    """Write the student's weights and rebuild spec to ``directory`` atomically."""
    directory = Path(directory)
    temporary = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    save_model(model, str(temporary / MODEL_FILE))
    (temporary / SPEC_FILE).write_text(spec.to_json() + "\n")
    files = {name: _sha256(temporary / name) for name in (MODEL_FILE, SPEC_FILE)}
    for name in files:
        _fsync(temporary / name)
    manifest = {"files": files, **(extra or {})}
    write_text_atomic(temporary / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(temporary, directory)


def is_complete(directory: Path) -> bool:
    """True when ``directory`` holds a manifest whose checksums match its files."""
    manifest_path = Path(directory) / MANIFEST_FILE
    if not manifest_path.is_file():
        return False
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (json.JSONDecodeError, KeyError):
        return False
    return all((Path(directory) / name).is_file() and _sha256(Path(directory) / name) == digest
               for name, digest in files.items())


def load_weights(model: nn.Module, directory: Path) -> None:
    """Load a complete checkpoint's weights into ``model`` (same architecture)."""
    if not is_complete(directory):
        raise UserError(f"{directory} is not a complete checkpoint (missing files or checksum mismatch)")
    missing, unexpected = load_model(model, str(Path(directory) / MODEL_FILE), strict=False)
    if unexpected or [m for m in missing if not _is_tied(model, m)]:
        raise UserError(f"{directory}: weights do not fit the student (missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]})")


def _is_tied(model: nn.Module, name: str) -> bool:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return name in tied


def load_student(directory: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, StudentSpec]:
    """Rebuild a student from a checkpoint folder alone (no teacher weights needed)."""
    from mixerdistill.plugins import get_mixer
    from mixerdistill.student import build_student
    from mixerdistill.teacher import find_adapter
    from mixerdistill.teacher_sources import DTYPES, config_from_dict
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    spec_path = directory / SPEC_FILE
    if not spec_path.is_file():
        raise UserError(f"{directory} has no {SPEC_FILE}: not a mixerdistill checkpoint")
    spec = StudentSpec.from_file(spec_path)
    values = dict(spec.teacher_config)
    model_type = values.pop("model_type")
    config = config_from_dict(model_type, values)
    dtype = DTYPES[spec.teacher.get("dtype", "float32")]
    skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    adapter = find_adapter(config, spec.adapter or None)
    mixer_cls = get_mixer(spec.mixer)
    student = build_student(skeleton, adapter, mixer_cls, mixer_cls.Config.model_validate(spec.mixer_config),
                            spec.keep_attention, transfer=False)
    load_weights(student, directory)
    return student.to(device).eval(), spec
