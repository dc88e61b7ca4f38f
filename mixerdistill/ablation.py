"""The stage-1 ablation: how closely each mixer family can reproduce the teacher's attention matrices.

For every entry of the recipe's ``ablation`` list, the recipe is run with that mixer as ``student.mixer``
(same teacher, layers, data, stages and seeds) into ``OUTPUT/<family>/``. Then every trained student is
measured on the same held-out windows: the stage-1 distance ‖A_teacher − M_student‖_F per (batch, head),
averaged, per replaced layer — the quantity MOHAWK's ablation compares. Writes ``ablation.json``,
``ablation.md`` (a table) and ``ablation.png`` (a bar chart).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mixerdistill.checkpoint import load_student, write_text_atomic
from mixerdistill.console import stderr_console
from mixerdistill.device import pick_device
from mixerdistill.errors import UserError
from mixerdistill.mixture import build_data
from mixerdistill.plots import pyplot
from mixerdistill.plugins import get_stage
from mixerdistill.recipe import Recipe
from mixerdistill.run import execute
from mixerdistill.run_directory import stage_directory
from mixerdistill.stages import StageContext
from mixerdistill.student import mixer_layers
from mixerdistill.teacher import find_adapter
from mixerdistill.teacher_sources import load_teacher

STAGE = "matrix_orientation"


def family_labels(recipe: Recipe) -> list[str]:
    """One directory-safe label per ablation entry: the mixer name, numbered when a name repeats."""
    names = [block.name for block in recipe.ablation]
    return [name if names.count(name) == 1 else f"{name}_{names[: i + 1].count(name)}" for i, name in enumerate(names)]


def held_out_distances(
    recipe: Recipe, checkpoint: Path, teacher, adapter, windows: torch.Tensor, device: torch.device
) -> dict[int, float]:
    """{layer: mean stage-1 distance over ``windows`` (N, T)} for the student saved in ``checkpoint``."""
    student, _ = load_student(checkpoint, device)
    return student_distances(recipe, student, teacher, adapter, windows, device)


def student_distances(
    recipe: Recipe, student, teacher, adapter, windows: torch.Tensor, device: torch.device
) -> dict[int, float]:
    """{layer: mean stage-1 distance over ``windows`` (N, T)} for every mixer layer of ``student``."""
    stage_block = next(block for block in recipe.stages if block.name == STAGE)
    batch_size = stage_block.config.batch_size
    stage = get_stage(STAGE)(
        stage_block.config,
        StageContext(teacher=teacher, student=student, adapter=adapter, mixers=mixer_layers(student, adapter)),
    )
    sums: dict[int, float] = {}
    with torch.no_grad():
        for start in range(0, len(windows), batch_size):
            batch = windows[start : start + batch_size].to(device)
            _, metrics = stage.loss(batch)
            for key, value in metrics.items():
                layer = int(key.removeprefix("layer_"))
                sums[layer] = sums.get(layer, 0.0) + float(value) * len(batch)
    return {layer: total / len(windows) for layer, total in sorted(sums.items())}


def run_ablation(recipe: Recipe, output: Path, overwrite: bool = False, show_progress: bool = True) -> dict:
    """Run every family of ``recipe.ablation`` and compare them; returns what ``ablation.json`` holds."""
    if not recipe.ablation:
        raise UserError("ablation: the recipe lists no mixer families to compare")
    stage_blocks = [block for block in recipe.stages if block.name == STAGE]
    if not stage_blocks:
        raise UserError(f"stages: the ablation compares stage-1 distances; add a '{STAGE}' stage")
    if not recipe.eval.tokens:
        raise UserError("eval.tokens: the held-out distances need held-out tokens (eval.tokens > 0)")
    index = recipe.stages.index(stage_blocks[-1]) + 1
    labels = family_labels(recipe)
    runs = {}
    for label, block in zip(labels, recipe.ablation):
        stderr_console.print(f"[bold]ablation[/]: {label}")
        family = recipe.model_copy(
            update={"student": recipe.student.model_copy(update={"mixer": block}), "ablation": []}
        )
        runs[label] = execute(
            family, output / label, resume=not overwrite, overwrite=overwrite, show_progress=show_progress
        )

    device = pick_device(recipe.device)
    teacher, tokenizer = load_teacher(recipe.teacher)
    teacher.to(device)
    adapter = find_adapter(teacher.config, recipe.teacher.adapter)
    data, _ = build_data(recipe.data, tokenizer, teacher, recipe.teacher.model_dump(mode="json"), show_progress)
    windows = data.heldout_windows(stage_blocks[-1].config.seq_len, recipe.eval.tokens)
    families = {}
    for label, block in zip(labels, recipe.ablation):
        checkpoint = stage_directory(output / label, index, STAGE)
        distances = held_out_distances(recipe, checkpoint, teacher, adapter, windows, device)
        stage_figures = runs[label].stages[index - 1]
        families[label] = {
            "mixer": {"name": block.name, **block.config.model_dump(mode="json")},
            "distance_per_layer": {str(k): v for k, v in distances.items()},
            "distance_mean": sum(distances.values()) / len(distances),
            "train_loss_first": stage_figures.loss_first,
            "train_loss_last": stage_figures.loss_last,
            "perplexity_after": stage_figures.perplexity_after,
        }
    result = {
        "recipe": recipe.name,
        "stage": STAGE,
        "heldout_tokens": int(windows.numel()),
        "seq_len": int(windows.shape[1]),
        "families": families,
    }
    write_text_atomic(output / "ablation.json", json.dumps(result, indent=2) + "\n")
    write_text_atomic(output / "ablation.md", render_table(result))
    plot_ablation(result, output / "ablation.png")
    stderr_console.print(f"[bold]wrote[/] {output}/ablation.png")
    return result


def render_table(result: dict) -> str:
    """Markdown: one row per family (sorted by mean distance), one column per layer."""
    families = sorted(result["families"].items(), key=lambda item: item[1]["distance_mean"])
    layers = list(families[0][1]["distance_per_layer"]) if families else []
    header = ["family", "mean", *[f"layer {layer}" for layer in layers], "perplexity after stage 1"]
    lines = [
        f"Stage-1 distance ‖A_teacher − M_student‖_F per (batch, head), on {result['heldout_tokens']} held-out "
        f"tokens (windows of {result['seq_len']}); lower is closer to attention.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for label, entry in families:
        perplexity = entry["perplexity_after"]
        cells = [
            label,
            f"{entry['distance_mean']:.4f}",
            *[f"{entry['distance_per_layer'][layer]:.4f}" for layer in layers],
            f"{perplexity:.1f}" if perplexity is not None else "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_ablation(result: dict, path: Path) -> None:
    """A grouped bar chart (layers × families) of the distances."""
    plt = pyplot()
    families = sorted(result["families"].items(), key=lambda item: item[1]["distance_mean"])
    layers = list(families[0][1]["distance_per_layer"])
    groups = [*layers, "mean"]
    width = 0.8 / len(families)
    figure, axes = plt.subplots(figsize=(1.6 + 1.2 * len(groups), 4))
    for i, (label, entry) in enumerate(families):
        values = [entry["distance_per_layer"][layer] for layer in layers] + [entry["distance_mean"]]
        axes.bar([g + (i - (len(families) - 1) / 2) * width for g in range(len(groups))], values, width, label=label)
    axes.set_xticks(range(len(groups)), [f"layer {layer}" for layer in layers] + ["mean"])
    axes.set_ylabel("‖A_teacher − M_student‖_F")
    axes.set_title(f"Stage-1 distance to attention, {result['recipe']}")
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
