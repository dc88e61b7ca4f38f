"""Checkpoints: a folder of files plus a ``manifest.json`` of their sha256 checksums.

Every checkpoint folder is written into a temporary sibling (``.<name>.tmp``), its files fsynced and
checksummed, the manifest written last, then the folder renamed into place. A folder whose manifest
matches its files is complete; anything else (a leftover ``.tmp``, a missing or mismatching manifest)
is never loaded.

Two kinds:

- a **stage checkpoint** (``stage_<n>_<name>/``): ``model.safetensors`` + ``student.json``, enough to
  rebuild the student without the teacher;
- a **progress checkpoint** (``resume/stage_<n>_<name>/step_<k>/``), written every few steps or
  minutes inside a stage: ``model.safetensors`` + ``state.pt`` (optimizer, scheduler, RNG states)
  and the data position in the manifest. Only the newest complete one is kept; the older one is
  deleted after the newer one is in place, so a kill at any moment leaves one to resume from.

Model weights are only ever read from safetensors; ``state.pt`` is read with
``torch.load(weights_only=True)``, which refuses pickled code.

Test hook: ``mixerdistill.faults.KILL_IN_CHECKPOINT`` kills the process inside a checkpoint write, to show
that a half-written checkpoint is ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_model
from torch import nn

from mixerdistill import faults
from mixerdistill.console import stderr_console
from mixerdistill.errors import UserError, writing
from mixerdistill.student import StudentSpec

MODEL_FILE = "model.safetensors"
SPEC_FILE = "student.json"
STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
PROGRESS_DIR = "resume"


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
    with writing(path):
        with open(temporary, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)


def write_checkpoint(directory: Path, write_files: Callable[[Path], None], extra: dict | None = None) -> None:
    """Create the checkpoint folder ``directory`` atomically.

    ``write_files(folder)`` writes the payload into a temporary folder; the manifest records each
    file's checksum plus ``extra``. A failed write (e.g. disk full) leaves any earlier checkpoint as
    it was and raises an OutputError.
    """
    directory = Path(directory)
    temporary = directory.with_name(f".{directory.name}.tmp")
    try:
        with writing(directory):
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir(parents=True)
            write_files(temporary)
            files = {}
            for path in sorted(temporary.iterdir()):
                _fsync(path)
                files[path.name] = _sha256(path)
            faults.checkpoint_written()
            write_text_atomic(temporary / MANIFEST_FILE, json.dumps({"files": files, **(extra or {})}, indent=2) + "\n")
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(temporary, directory)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def save_checkpoint(model: nn.Module, spec: StudentSpec, directory: Path, extra: dict | None = None) -> None:
    """Write the student's weights and rebuild spec to ``directory`` atomically."""

    def write_files(folder: Path) -> None:
        save_model(model, str(folder / MODEL_FILE))
        (folder / SPEC_FILE).write_text(spec.to_json() + "\n")

    write_checkpoint(directory, write_files, extra)


class CheckpointDamaged(UserError):
    """A checkpoint folder (not a half-written ``.tmp`` one: those are never renamed into place) whose
    manifest or checksums fail: its files were changed, truncated or lost after it was written."""


def _inspect(directory: Path) -> tuple[dict | None, str | None]:
    """(manifest, None) for a complete checkpoint, else (None, what is wrong with it)."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
        files = manifest["files"]
        names = list(files.items())
    except FileNotFoundError:
        return None, f"{MANIFEST_FILE} is missing"
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        return None, f"{MANIFEST_FILE} is unreadable"
    for name, digest in names:
        if not (directory / name).is_file():
            return None, f"{name} is missing"
        if _sha256(directory / name) != digest:
            return None, f"{name} sha256 mismatch"
    return manifest, None


def checkpoint_problem(directory: Path) -> str | None:
    """What makes ``directory`` an incomplete or damaged checkpoint (None when it is complete)."""
    return _inspect(directory)[1]


def read_manifest(directory: Path) -> dict | None:
    """The manifest of a complete checkpoint, else None."""
    return _inspect(directory)[0]


def is_complete(directory: Path) -> bool:
    """True when ``directory`` holds a manifest whose checksums match its files."""
    return read_manifest(directory) is not None


def finished_stage(directory: Path, index: int) -> dict | None:
    """The manifest of stage ``index``'s checkpoint folder ``directory``; None when there is none.
    A folder that exists but fails its manifest raises CheckpointDamaged (never silently retrained)."""
    if not Path(directory).exists():
        return None
    manifest, problem = _inspect(directory)
    if problem is not None:
        raise CheckpointDamaged(
            f"stage {index} checkpoint is damaged: {problem} ({directory}). Restore it, or "
            f"delete that folder to train stage {index} again"
        )
    return manifest


def load_weights(model: nn.Module, directory: Path) -> None:
    """Load a complete checkpoint's weights into ``model`` (same architecture)."""
    problem = checkpoint_problem(directory)
    if problem is not None:
        raise CheckpointDamaged(f"checkpoint {directory} is damaged: {problem}")
    try:
        assign_weights(model, load_file(Path(directory) / MODEL_FILE))
    except ValueError as error:
        raise UserError(f"{directory}: weights do not fit the student ({error})") from None


def assign_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Set ``model``'s parameters and buffers to ``state``'s tensors (tied names may be absent) by rebinding
    each one's ``.data``, never writing into the tensor it had: a student's untrained parts lie on the
    teacher's storage (mixerdistill.student); a tensor equal to the one it has is left as it is."""
    expected = model.state_dict()
    given = {_tensor_key(expected[name]) for name in state if name in expected}
    # A tied tensor is written once, under one of its names (safetensors keeps lm_head.weight of a tied embedding).
    missing = [name for name in expected if name not in state and _tensor_key(expected[name]) not in given]
    unexpected = [name for name in state if name not in expected]
    wrong = [name for name in state if name in expected and state[name].shape != expected[name].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"missing {missing[:5]}, unexpected {unexpected[:5]}, of another shape {wrong[:5]}")
    for name, value in state.items():
        module_name, _, attribute = name.rpartition(".")
        target = getattr(model.get_submodule(module_name), attribute)
        value = value.to(device=target.device, dtype=target.dtype)
        if not torch.equal(value, target.data):
            target.data = value.clone()  # load_file's tensors lie on a mapping of the file


def _tensor_key(tensor: torch.Tensor) -> tuple:
    """What two names of one tied tensor have in common (storage, offset, shape); never equal for two tensors."""
    if not tensor.numel():
        return (id(tensor),)
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))


def load_student(directory: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, StudentSpec]:
    """Rebuild a student from a checkpoint folder alone (no teacher weights needed)."""
    from transformers import AutoModelForCausalLM

    from mixerdistill.plugins import get_mixer
    from mixerdistill.q8 import q8_structure
    from mixerdistill.student import build_student
    from mixerdistill.teacher import find_adapter
    from mixerdistill.teacher_sources import DTYPES, config_from_dict

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
    if spec.teacher.get("embedding_storage") == "q8_0":
        q8_structure(skeleton)
    adapter = find_adapter(config, spec.adapter or None)
    mixer_cls = get_mixer(spec.mixer)
    student = build_student(
        skeleton,
        adapter,
        mixer_cls,
        mixer_cls.Config.model_validate(spec.mixer_config),
        spec.keep_attention,
        transfer=False,
    )
    load_weights(student, directory)
    return student.to(device).eval(), spec


@dataclass
class ResumePoint:
    """A complete progress checkpoint: ``step`` optimizer steps of its stage were done."""

    step: int
    directory: Path
    info: dict  # the manifest's JSON fields (losses so far, metrics position, the caller's extras)


class StageProgress:
    """Periodic mid-stage checkpoints of one stage, kept in ``root`` (``step_<k>/`` folders).

    ``every_steps`` / ``every_minutes`` (either may be None) say when one is due; the newest
    complete folder is the point a resumed run continues from.
    """

    def __init__(self, root: Path, every_steps: int | None = None, every_minutes: float | None = None):
        self.root = Path(root)
        self.every_steps = every_steps
        self.every_seconds = every_minutes * 60 if every_minutes is not None else None
        self.last_saved = time.monotonic()

    def due(self, step: int) -> bool:
        """Whether a checkpoint is due after ``step`` (1-based) optimizer steps."""
        if self.every_steps is not None and step % self.every_steps == 0:
            return True
        return self.every_seconds is not None and time.monotonic() - self.last_saved >= self.every_seconds

    def save(self, step: int, model: nn.Module, state: dict, info: dict) -> None:
        """Write ``step_<step>/`` (weights, ``state`` via torch.save, ``info`` in the manifest), then
        delete the older ones."""

        def write_files(folder: Path) -> None:
            save_model(model, str(folder / MODEL_FILE))
            torch.save(state, folder / STATE_FILE)

        directory = self.root / f"step_{step:08d}"
        write_checkpoint(directory, write_files, {"step": step, **info})
        for older in self.root.iterdir():
            if older != directory:
                shutil.rmtree(older, ignore_errors=True)
        self.last_saved = time.monotonic()

    def latest(self) -> ResumePoint | None:
        """The newest complete checkpoint, or None. Half-written ones (``.step_*.tmp``) are skipped; a
        damaged one (a ``step_*`` folder failing its manifest) is skipped with a warning naming it."""
        if not self.root.is_dir():
            return None
        damaged = []
        for directory in sorted(self.root.glob("step_*"), reverse=True):
            manifest, problem = _inspect(directory)
            if manifest is not None:
                break
            damaged.append(f"{directory.name} ({problem})")
        else:
            manifest = None
        if damaged:
            fallback = directory.name if manifest is not None else "the start of the stage"
            stderr_console.print(
                f"[yellow]warning:[/] damaged progress checkpoint(s) in {self.root}: "
                f"{', '.join(damaged)}; falling back to {fallback}",
                highlight=False,
                soft_wrap=True,
            )
        return ResumePoint(manifest["step"], directory, manifest) if manifest is not None else None

    @staticmethod
    def load(point: ResumePoint, model: nn.Module) -> dict:
        """Load ``point``'s weights into ``model`` and return its ``state`` dict."""
        load_weights(model, point.directory)
        try:
            return torch.load(point.directory / STATE_FILE, weights_only=True)
        except Exception as error:  # weights_only refuses anything but tensors and plain containers
            raise UserError(
                f"{point.directory / STATE_FILE} cannot be loaded safely ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}); delete {point.directory} "
                f"to resume from the start of the stage"
            ) from None

    def clear(self) -> None:
        """Delete this stage's progress checkpoints (and the ``resume/`` folder once it is empty)."""
        shutil.rmtree(self.root, ignore_errors=True)
        if self.root.parent.is_dir() and not any(self.root.parent.iterdir()):
            self.root.parent.rmdir()
