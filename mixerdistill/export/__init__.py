"""``mixerdistill export``: a student as a self-contained Hugging Face model folder.

The folder loads with ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` where only torch
and transformers are installed:

    config.json                   the teacher's configuration + mixer, mixer_options, mixer_layers, auto_map
    configuration_mixerdistill.py ``MixerdistillConfig``: a subclass of the teacher's configuration class
    modeling_mixerdistill.py      ``MixerdistillForCausalLM``: the teacher's model class, mixers swapped in
    mixerdistill_*.py             the mixer's own code and what it uses (``mixerdistill.export.source``)
    model.safetensors             weights (``model-0000x-of-0000n.safetensors`` + index above the shard size)
    generation_config.json, tokenizer files, README.md (model card), LICENSE (the teacher's, when found)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mixerdistill.errors import UserError
from mixerdistill.export.card import model_card, read_run_report, teacher_licence
from mixerdistill.export.source import export_sources, flat_name

TEMPLATES = Path(__file__).parent
CONFIGURATION_FILE = "configuration_mixerdistill.py"
MODELING_FILE = "modeling_mixerdistill.py"
AUTO_MAP = {
    "AutoConfig": "configuration_mixerdistill.MixerdistillConfig",
    "AutoModelForCausalLM": "modeling_mixerdistill.MixerdistillForCausalLM",
}
EXPORT_MARK = "# export: "
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ExportResult:
    """What ``export_student`` wrote: the folder, its size and the files in it."""

    folder: Path
    bytes: int
    files: list[str]
    checkpoint: Path


def _import_as(name: str, alias: str, module: str = "transformers") -> str:
    """The import line a template's marked line becomes: ``from MODULE import NAME as ALIAS``."""
    return f"from {module} import {name} as {alias}"


def _mixer_classes(classes: dict) -> str:
    """The lines a template's ``MIXER_CLASSES`` becomes: each class imported from its exported module, then
    the dict of them by registered name."""
    imports = [_import_as(c.__name__, f"_{c.__name__}", f".{flat_name(c.__module__)}") for c in classes.values()]
    entries = ", ".join(f'"{name}": _{c.__name__}' for name, c in classes.items())
    return "\n".join([*imports, f"MIXER_CLASSES = {{{entries}}}"])


def _fill_template(template: str, replacements: dict[str, str]) -> str:
    """A template file with each line marked ``# export: <what>`` replaced by ``replacements[<what>]``."""
    lines = []
    for line in (TEMPLATES / template).read_text().splitlines():
        if EXPORT_MARK in line:
            what = line.split(EXPORT_MARK, 1)[1].strip()
            line = f"{replacements[what]}  {EXPORT_MARK}{what}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def _check_destination(destination: Path, overwrite: bool) -> None:
    if destination.exists() and not destination.is_dir():
        raise UserError(f"--to {destination} is a file, not a folder")
    if destination.is_dir() and any(destination.iterdir()) and not overwrite:
        raise UserError(f"--to {destination} is not empty; choose another folder or pass --overwrite to replace it")


def _publish(folder: Path, destination: Path) -> None:
    """Put the finished ``folder`` at ``destination``, replacing what was there (the caller checked it may),
    with the permissions of an ordinary new folder (temporary folders and files are private)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)
    if destination.exists():
        shutil.rmtree(destination)
    os.replace(folder, destination)


def export_student(
    run: Path,
    destination: Path,
    *,
    stage: int | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
    max_shard_size: str = "2GB",
) -> ExportResult:
    """Write the student of ``run`` (a run directory or stage checkpoint folder) to ``destination``.

    Nothing is written to ``destination`` until the folder is complete (it is built beside it and moved).
    """
    from mixerdistill.checkpoint import load_student
    from mixerdistill.harness import find_checkpoint, load_tokenizer
    from mixerdistill.mixer_layer import MixerLayer
    from mixerdistill.plugins import get_mixer
    from mixerdistill.q8 import float_embedding
    from mixerdistill.run_directory import RECIPE_FILE

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    destination = Path(destination)
    _check_destination(destination, overwrite)
    checkpoint = find_checkpoint(run, stage)
    run_dir = checkpoint.parent if (checkpoint.parent / RECIPE_FILE).is_file() else None
    student, spec = load_student(checkpoint)
    float_embedding(student)  # a Q8 embedding becomes the family's own again
    student.to(DTYPES[dtype])
    mixer_cls = get_mixer(spec.mixer)
    validated = mixer_cls.Config.model_validate(spec.mixer_config)
    options = validated.model_dump(mode="json")
    part_classes = mixer_cls.part_classes(validated)
    mixer_layers = {
        path: asdict(module.mixer.geometry)
        for path, module in student.named_modules()
        if isinstance(module, MixerLayer)
    }
    licence = teacher_licence(spec.teacher)

    destination.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".partial", dir=destination.parent))
    try:
        student.save_pretrained(folder, max_shard_size=max_shard_size)
        config = json.loads((folder / "config.json").read_text())
        config.update(
            model_type="mixerdistill",
            architectures=["MixerdistillForCausalLM"],
            auto_map=AUTO_MAP,
            mixer=spec.mixer,
            mixer_options=options,
            mixer_layers=mixer_layers,
            teacher_model_type=student.config.model_type,
        )
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        modules = ["mixerdistill.mixer_layer", mixer_cls.__module__, *(c.__module__ for c in part_classes.values())]
        for name, source in export_sources(list(dict.fromkeys(modules))).items():
            (folder / name).write_text(source)
        (folder / CONFIGURATION_FILE).write_text(
            _fill_template(
                "configuration_template.py",
                {"the teacher's configuration class": _import_as(type(student.config).__name__, "TeacherConfig")},
            )
        )
        (folder / MODELING_FILE).write_text(
            _fill_template(
                "modeling_template.py",
                {
                    "the teacher's model class": _import_as(type(student).__name__, "TeacherForCausalLM"),
                    "the student's mixer class": _import_as(
                        mixer_cls.__name__, "Mixer", f".{flat_name(mixer_cls.__module__)}"
                    ),
                    "the mixer classes the student's mixer builds by name": _mixer_classes(part_classes),
                },
            )
        )
        load_tokenizer(checkpoint).save_pretrained(folder)
        report = read_run_report(run_dir)
        name = report.get("recipe") or (run_dir.name if run_dir else checkpoint.name)
        (folder / "README.md").write_text(
            model_card(
                name=f"{name} ({spec.mixer} student)",
                spec_teacher=spec.teacher,
                mixer=spec.mixer,
                options=options,
                mixer_layers=mixer_layers,
                num_layers=student.config.num_hidden_layers,
                parameters=sum(p.numel() for p in student.parameters()),
                dtype=dtype,
                stage_folder=checkpoint.name,
                licence=licence,
                report=report,
                run_dir=run_dir,
            )
        )
        if licence.text:
            (folder / "LICENSE").write_text(licence.text)
        _publish(folder, destination)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    files = sorted(p.name for p in destination.iterdir())
    size = sum(p.stat().st_size for p in destination.iterdir())
    return ExportResult(destination, size, files, checkpoint)


def push_to_hub(folder: Path, repo: str, private: bool = False) -> str:
    """Upload an exported folder to the Hugging Face hub repository ``repo`` (created if missing); returns ``repo``.

    Needs network access and a token (``hf auth login``); install the ``hub`` extra.
    """
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise UserError("--push-to-hub needs huggingface_hub: pip install 'mixerdistill[hub]'") from None
    api = HfApi()
    api.create_repo(repo, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo, commit_message="Export from mixerdistill")
    return repo
