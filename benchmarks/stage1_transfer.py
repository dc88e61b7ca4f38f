"""Held-out stage-1 distance right after weight transfer, for every family of an ablation recipe.

The quick companion of ``mixerdistill ablate``: no training, one process, the teacher loaded once. Each
family replaces the recipe's layers, is built by ``from_attention`` and measured on the same held-out
windows with the recipe's stage-1 distance (sink columns left out as the recipe says). With few stage-1
tokens the starting point decides most of the ablation's ranking (docs/smollm2.md), so this is where
a new mixer family is first compared.

    python benchmarks/stage1_transfer.py [recipes/smollm2_stage1_ablation.yaml] [--tokens 512] [--set ...]
"""

from __future__ import annotations

import argparse
import json

import torch

from mixerdistill.ablation import family_labels, student_distances
from mixerdistill.bench import RESULTS_DIR, print_table, write_result
from mixerdistill.data import TokenData
from mixerdistill.plugins import get_dataset, get_mixer
from mixerdistill.recipe import load_recipe
from mixerdistill.student import build_student
from mixerdistill.teacher import find_adapter
from mixerdistill.teacher_sources import load_teacher


def run(recipe_path: str, tokens: int, overrides: list[str]) -> dict:
    recipe = load_recipe(recipe_path, overrides)
    torch.manual_seed(recipe.seed)
    torch.set_num_threads(recipe.threads or torch.get_num_threads())
    stage_block = next(block for block in recipe.stages if block.name == "matrix_orientation")
    teacher, tokenizer = load_teacher(recipe.teacher)
    adapter = find_adapter(teacher.config, recipe.teacher.adapter)
    data = TokenData(get_dataset(recipe.data.source)(recipe.data.config), tokenizer)
    windows = data.heldout_windows(stage_block.config.seq_len, tokens)
    rows = []
    for label, block in zip(family_labels(recipe), recipe.ablation):
        student = build_student(teacher, adapter, get_mixer(block.name), block.config, recipe.student.keep_attention)
        distances = student_distances(recipe, student, teacher, adapter, windows, torch.device("cpu"))
        rows.append(
            {
                "family": label,
                "mixer": {"name": block.name, **block.config.model_dump(mode="json")},
                "distance_mean": sum(distances.values()) / len(distances),
                **{f"layer_{layer}": value for layer, value in distances.items()},
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        del student
    return {
        "benchmark": "stage1_transfer",
        "recipe": recipe.name,
        "heldout_tokens": int(windows.numel()),
        "seq_len": int(windows.shape[1]),
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default="recipes/smollm2_stage1_ablation.yaml")
    parser.add_argument("--tokens", type=int, default=512, help="held-out tokens (windows of the stage's seq_len)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override, repeatable")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    result = run(args.recipe, args.tokens, args.overrides)
    layers = [key for key in result["rows"][0] if key.startswith("layer_")]
    print_table(
        [{k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()} for row in result["rows"]],
        ["family", "distance_mean", *layers],
    )
    if not args.no_write:
        print(f"wrote {write_result('stage1_transfer', result, RESULTS_DIR)}")


if __name__ == "__main__":
    main()
