"""PNG plots of a run (matplotlib, no display needed): training loss per stage, per-layer distances of
stages 1 and 2 at the start and end of the stage, and a teacher-vs-student mixing-matrix picture."""

from __future__ import annotations

import json
from pathlib import Path

import torch

LAYER_PREFIX = "layer_"  # per-layer distances in metrics.jsonl are logged as layer_<index>
EDGE_STEPS = 5  # distances at the start (end) of a stage: mean over its first (last) steps, up to this many


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_stage_records(metrics_path: Path) -> list[tuple[str, list[dict]]]:
    """metrics.jsonl split into stages, in order: [(stage name, its step records)]."""
    stages: list[tuple[str, list[dict]]] = []
    for line in Path(metrics_path).read_text().splitlines():
        record = json.loads(line)
        if not stages or record["step"] == 1 or record["stage"] != stages[-1][0]:
            stages.append((record["stage"], []))
        stages[-1][1].append(record)
    return stages


def layer_distances(records: list[dict]) -> tuple[list[int], list[float], list[float]] | None:
    """(layer indices, mean distance over the first steps, over the last steps) of one stage, or None
    when the stage logs no per-layer distances."""
    layers = sorted(int(k[len(LAYER_PREFIX) :]) for k in records[0] if k.startswith(LAYER_PREFIX))
    if not layers:
        return None
    count = min(EDGE_STEPS, max(1, len(records) // 2))

    def mean(steps: list[dict], layer: int) -> float:
        return sum(step[f"{LAYER_PREFIX}{layer}"] for step in steps) / len(steps)

    return (layers, [mean(records[:count], i) for i in layers], [mean(records[-count:], i) for i in layers])


def write_run_plots(directory: Path) -> list[str]:
    """Write ``loss.png`` and (when stages log per-layer distances) ``layer_distances.png`` into the run
    directory from its metrics.jsonl; returns the file names written."""
    metrics = Path(directory) / "metrics.jsonl"
    if not metrics.is_file() or not metrics.read_text().strip():
        return []
    plt = pyplot()
    stages = read_stage_records(metrics)
    written = []

    figure, axes = plt.subplots(1, len(stages), figsize=(4 * len(stages), 3.2), squeeze=False)
    for axis, (index, (name, records)) in zip(axes[0], enumerate(stages, start=1)):
        axis.plot([r["tokens"] for r in records], [r["loss"] for r in records], linewidth=1)
        axis.set_title(f"stage {index}: {name}", fontsize=9)
        axis.set_xlabel("training tokens")
        if all(r["loss"] > 0 for r in records):
            axis.set_yscale("log")
    axes[0][0].set_ylabel("loss")
    figure.tight_layout()
    figure.savefig(Path(directory) / "loss.png", dpi=100)
    plt.close(figure)
    written.append("loss.png")

    with_layers = [(i, name, layer_distances(records)) for i, (name, records) in enumerate(stages, start=1)]
    with_layers = [entry for entry in with_layers if entry[2] is not None]
    if with_layers:
        figure, axes = plt.subplots(1, len(with_layers), figsize=(5 * len(with_layers), 3.2), squeeze=False)
        for axis, (index, name, (layers, first, last)) in zip(axes[0], with_layers):
            axis.plot(layers, first, marker="o", markersize=3, label="start of stage")
            axis.plot(layers, last, marker="o", markersize=3, label="end of stage")
            axis.set_title(f"stage {index}: {name}", fontsize=9)
            axis.set_xlabel("layer")
            axis.xaxis.get_major_locator().set_params(integer=True)
            axis.legend(fontsize=8)
        axes[0][0].set_ylabel("distance to teacher")
        figure.tight_layout()
        figure.savefig(Path(directory) / "layer_distances.png", dpi=100)
        plt.close(figure)
        written.append("layer_distances.png")
    return written


def heldout_tokens(checkpoint: Path, tokenizer, length: int) -> torch.Tensor:
    """(1, length) tokens from the start of the run's held-out text (the run's recipe names its data)."""
    import yaml

    from mixerdistill.data import TokenData, tokenize_documents
    from mixerdistill.errors import UserError
    from mixerdistill.mixture import make_source
    from mixerdistill.recipe import validate_recipe
    from mixerdistill.run_directory import RECIPE_FILE

    recipe_path = checkpoint.parent / RECIPE_FILE
    if not recipe_path.is_file():
        raise UserError(f"no {RECIPE_FILE} beside {checkpoint}: inspect a checkpoint inside its run directory")
    recipe = validate_recipe(yaml.safe_load(recipe_path.read_text()), source=str(recipe_path))
    block = recipe.data.mix[0] if recipe.data.mix else recipe.data  # a mixture's held-out text is its first source's
    source = make_source(block.source, block.config, tokenizer)
    documents = source.documents("heldout")
    if documents is None:
        stream = TokenData(source, tokenizer).heldout
    else:
        stream = tokenize_documents(tokenizer, [next(iter(documents))[: length * 16]])
    if len(stream) < length:
        raise UserError(f"the held-out text has only {len(stream)} tokens; ask for fewer with --tokens")
    return stream[:length].unsqueeze(0)


@torch.no_grad()
def inspect_mixing(checkpoint: Path, layer: int, head: int, length: int, path: Path) -> float:
    """Draw the teacher's attention matrix and the student's mixing matrix of ``layer``/``head`` for the
    first ``length`` held-out tokens, both fed the teacher's input to that layer (as stage 1 does).
    Writes a PNG to ``path``; returns ‖A_teacher − M_student‖_F for that head."""
    from mixerdistill.checkpoint import load_student
    from mixerdistill.errors import UserError
    from mixerdistill.harness import load_teacher_of, load_tokenizer
    from mixerdistill.stages import teacher_attention_mixer
    from mixerdistill.student import mixer_layers
    from mixerdistill.teacher import find_adapter, trace_teacher

    student, spec = load_student(checkpoint)
    teacher = load_teacher_of(checkpoint)
    adapter = find_adapter(teacher.config, spec.adapter or None)
    mixers = mixer_layers(student, adapter)
    if layer not in mixers:
        raise UserError(
            f"--layer {layer}: the student has no mixer there (replaced layers: "
            f"{min(mixers)}–{max(mixers)}, kept attention: {spec.keep_attention or 'none'})"
        )
    heads = adapter.geometry(teacher.config, layer).num_heads
    if head >= heads:
        raise UserError(f"--head {head}: layer {layer} has {heads} heads (0–{heads - 1})")
    input_ids = heldout_tokens(checkpoint, load_tokenizer(checkpoint), length)
    trace = trace_teacher(teacher, adapter, input_ids, record={"mixer_inputs"}, layers={layer})
    hidden = trace.mixer_inputs[layer]  # (1, T, D)
    target = teacher_attention_mixer(teacher, adapter, layer).mixing_matrix(hidden, trace.rotary(layer))[0, head]
    matrix = mixers[layer].mixing_matrix(hidden, trace.rotary(layer))[0, head]  # (T, T)
    distance = torch.linalg.matrix_norm(matrix - target, ord="fro").item()

    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(9, 4.3))
    scale = max(target.abs().max().item(), 1e-12)
    for axis, values, title in ((axes[0], target, "teacher attention"), (axes[1], matrix, f"student ({spec.mixer})")):
        image = axis.imshow(values.float().cpu().numpy(), cmap="RdBu_r", vmin=-scale, vmax=scale)
        axis.set_title(f"{title}, layer {layer}, head {head}", fontsize=9)
        axis.set_xlabel("source token")
    axes[0].set_ylabel("target token")
    figure.colorbar(image, ax=list(axes), shrink=0.8)
    figure.suptitle(f"‖A − M‖_F = {distance:.3f} on {length} held-out tokens", fontsize=9)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return distance
