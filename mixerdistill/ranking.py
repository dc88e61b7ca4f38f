"""Layer ranking: what replacing each teacher layer alone costs, to choose which layers keep attention.

For each ranked layer, the student is the teacher with only that layer's attention replaced by the recipe's
mixer (transferred), after a short layer-local stage 2 (``ranking.tokens``). The layers are independent in
stage 2 (each layer's loss depends only on its own mixer, AdamW is per parameter and the alignment does not
clip), so every missing layer is aligned in one stage-2 run: one teacher forward per step serves them all.
Then, on the same held-out windows:

  stage1   ‖A_teacher − M_student‖_F per (batch, head) (stage 1's distance)       ┐ every layer from one
  stage2   the stage-2 distance of the layer's output (``ranking.target``)        ┘ teacher pass: cheapest
  kl       KL(teacher ‖ student) per token, the student running from the teacher's input to that layer
  ppl      that student's perplexity

Each measure ranks the layers, largest cost first; ``spearman`` says how well each proxy orders the layers
as KL does. The per-layer results live in a cache folder keyed by the teacher, the mixer, the data, the
seed and the ranking settings (``ranking_key``): each layer's aligned mixer and scores are written as soon
as they exist, a rerun skips what is there, and ``keep_attention: {auto: K}`` reads the same folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mixerdistill.cache import cache_dir
from mixerdistill.checkpoint import write_text_atomic
from mixerdistill.console import stderr_console
from mixerdistill.errors import UserError
from mixerdistill.logits import chunk_kd, final_hidden
from mixerdistill.mixer_layer import MixerLayer
from mixerdistill.mixture import build_data
from mixerdistill.plugins import get_mixer, get_stage
from mixerdistill.recipe import RANKING_MEASURES, Recipe
from mixerdistill.stages import StageContext
from mixerdistill.student import build_student, mixer_layers
from mixerdistill.teacher import find_adapter, trace_teacher
from mixerdistill.teacher_sources import load_teacher
from mixerdistill.training import Placement, Reporting, train_stage

LOCAL_MEASURES = ("stage1", "stage2")  # from one teacher pass for every layer
RANKING_FILE = "ranking.json"


def ranking_key(recipe: Recipe) -> str:
    """A hash of everything a layer's scores depend on: teacher, mixer, init, data, seed, ranking settings."""
    resolved = recipe.resolved()
    basis = {
        "teacher": resolved["teacher"],
        "mixer": resolved["student"]["mixer"],
        "init": resolved["student"]["init"],
        "data": resolved["data"],
        "seed": recipe.seed,
        "ranking": resolved["ranking"],
    }
    return hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()[:16]


def spearman(first: list[float], second: list[float]) -> float | None:
    """Spearman's ρ: the Pearson correlation of the two lists' ranks (ties share their mean rank); None
    for fewer than two values or a constant list."""

    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        result = [0.0] * len(values)
        start = 0
        while start < len(order):
            stop = start
            while stop + 1 < len(order) and values[order[stop + 1]] == values[order[start]]:
                stop += 1
            for position in range(start, stop + 1):
                result[order[position]] = (start + stop) / 2
            start = stop + 1
        return result

    if len(first) < 2:
        return None
    a, b = ranks(first), ranks(second)
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    covariance = sum((x - mean_a) * (y - mean_b) for x, y in zip(a, b))
    spread = math.sqrt(sum((x - mean_a) ** 2 for x in a) * sum((y - mean_b) ** 2 for y in b))
    return covariance / spread if spread > 0 else None


@dataclass
class Models:
    """The teacher and what the ranking needs of it: adapter, held-out windows (N, T), device."""

    teacher: torch.nn.Module
    adapter: object
    windows: torch.Tensor
    device: torch.device
    data: object


def load_models(recipe: Recipe, device: torch.device, show_progress: bool) -> Models:
    """Teacher, adapter, data and the held-out windows of ``recipe.ranking``."""
    teacher, tokenizer = load_teacher(recipe.teacher)
    teacher.to(device).eval()
    adapter = find_adapter(teacher.config, recipe.teacher.adapter)
    data, _ = build_data(recipe.data, tokenizer, teacher, recipe.teacher.model_dump(mode="json"), show_progress)
    spec = recipe.ranking
    windows = data.heldout_windows(spec.seq_len, spec.heldout_tokens)
    if len(windows) == 0:
        raise UserError(f"ranking: no held-out window of {spec.seq_len} tokens; lower ranking.seq_len")
    return Models(teacher, adapter, windows, device, data)


class LayerRanking:
    """The per-layer results of one ranking key in ``folder``: ``layer_<i>.safetensors`` (the aligned mixer),
    ``layer_<i>.json`` (its measures and seconds), ``alignment.json`` (what the alignment cost)."""

    def __init__(self, recipe: Recipe, models: Models, folder: Path, show_progress: bool = True):
        self.recipe, self.models, self.folder, self.show_progress = recipe, models, folder, show_progress
        self.mixer_cls = get_mixer(recipe.student.mixer.name)
        self.layer_count = len(models.adapter.layers(models.teacher))

    # -- files ---------------------------------------------------------------------------------
    def scores(self, layer: int) -> dict:
        path = self.folder / f"layer_{layer}.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def _write_scores(self, layer: int, scores: dict) -> None:
        write_text_atomic(self.folder / f"layer_{layer}.json", json.dumps(scores, indent=2) + "\n")

    def _weights(self, layer: int) -> Path:
        return self.folder / f"layer_{layer}.safetensors"

    # -- phases --------------------------------------------------------------------------------
    def run(self, layers: list[int], measures: list[str]) -> dict[int, dict]:
        """Every measure of ``measures`` for every layer of ``layers``, computing only what is missing."""
        bad = [layer for layer in layers if not 0 <= layer < self.layer_count]
        if bad:
            raise UserError(f"--layers {bad} out of range: the teacher has {self.layer_count} layers")
        unaligned = [layer for layer in layers if not self._weights(layer).is_file()]
        if unaligned:
            self.align(unaligned)
        local = [m for m in measures if m in LOCAL_MEASURES]
        missing = [layer for layer in layers if any(m not in self.scores(layer) for m in local)]
        if missing:
            self.measure_local(missing)
        if {"kl", "ppl"} & set(measures):
            self.measure_logits([layer for layer in layers if not {"kl", "ppl"} <= set(self.scores(layer))])
        return {layer: self.scores(layer) for layer in layers}

    def student(self, layers: list[int], aligned: bool) -> torch.nn.Module:
        """The teacher with ``layers`` replaced by transferred mixers (loaded from their files if ``aligned``)."""
        recipe, models = self.recipe, self.models
        torch.manual_seed(recipe.seed)
        keep = [i for i in range(self.layer_count) if i not in layers]
        student = build_student(
            models.teacher,
            models.adapter,
            self.mixer_cls,
            recipe.student.mixer.config,
            keep,
            transfer=recipe.student.init == "transfer",
        )
        if aligned:
            for layer, mixer in mixer_layers(student, models.adapter).items():
                mixer.load_state_dict(load_file(self._weights(layer), device=str(models.device)))
        return student

    def _context(self, student: torch.nn.Module) -> StageContext:
        models = self.models
        return StageContext(models.teacher, student, models.adapter, mixer_layers(student, models.adapter))

    def align(self, layers: list[int]) -> None:
        """The short stage 2 of ``layers``, all at once; writes each layer's mixer."""
        spec, models = self.recipe.ranking, self.models
        stderr_console.print(f"[bold]ranking[/]: aligning layers {layers} ({spec.tokens} tokens of stage 2)")
        student = self.student(layers, aligned=False)
        stage_cls = get_stage("hidden_state_alignment")
        config = stage_cls.Config.model_validate(
            {
                "tokens": spec.tokens,
                "batch_size": spec.batch_size,
                "seq_len": spec.seq_len,
                "optimizer": {"lr": spec.lr, "weight_decay": 0.0},
                "schedule": {"name": "constant", "warmup": 0.0},
                "grad_clip": None,
                "target": spec.target,
                "distance": spec.distance,
            }
        )
        batches = models.data.train_batches(spec.batch_size, spec.seq_len, self.recipe.seed)
        result = train_stage(
            stage_cls(config, self._context(student)),
            "ranking alignment",
            student,
            batches,
            Placement(models.device),
            Reporting(self.folder / "alignment_metrics.jsonl", show_progress=self.show_progress),
        )
        for layer, mixer in mixer_layers(student, models.adapter).items():
            save_file({k: v.contiguous() for k, v in mixer.state_dict().items()}, str(self._weights(layer)))
        log = self.folder / "alignment.json"
        earlier = json.loads(log.read_text()) if log.is_file() else []
        entry = {"layers": layers, "seconds": result.seconds, "tokens": result.tokens}
        write_text_atomic(log, json.dumps([*earlier, entry], indent=2) + "\n")

    @torch.no_grad()
    def measure_local(self, layers: list[int]) -> None:
        """stage1 and stage2 held-out distances of ``layers`` (aligned), from one teacher pass per batch each."""
        started = time.perf_counter()
        student = self.student(layers, aligned=True)
        context = self._context(student)
        spec = self.recipe.ranking
        sums: dict[str, dict[int, float]] = {}
        for measure, name, options in (
            ("stage1", "matrix_orientation", {}),
            ("stage2", "hidden_state_alignment", {"target": spec.target, "distance": spec.distance}),
        ):
            stage_cls = get_stage(name)
            config = stage_cls.Config.model_validate(
                {"tokens": 1, "batch_size": spec.batch_size, "seq_len": spec.seq_len, **options}
            )
            stage = stage_cls(config, context)
            sums[measure] = self._held_out_sums(stage)
        seconds = (time.perf_counter() - started) / len(layers)
        for layer in layers:
            scores = self.scores(layer)
            scores.update({measure: sums[measure][layer] for measure in LOCAL_MEASURES}, seconds_local=seconds)
            self._write_scores(layer, scores)

    def _held_out_sums(self, stage) -> dict[int, float]:
        """{layer: mean of the stage's per-layer metric over the held-out windows}."""
        windows, batch_size = self.models.windows, self.recipe.ranking.batch_size
        sums: dict[int, float] = {}
        for start in range(0, len(windows), batch_size):
            batch = windows[start : start + batch_size].to(self.models.device)
            _, metrics = stage.loss(batch)
            for key, value in metrics.items():
                layer = int(key.removeprefix("layer_"))
                sums[layer] = sums.get(layer, 0.0) + float(value) * len(batch)
        return {layer: total / len(windows) for layer, total in sums.items()}

    @torch.no_grad()
    def measure_logits(self, layers: list[int]) -> None:
        """kl and ppl of each of ``layers`` alone, written as each layer finishes."""
        if not layers:
            return
        models = self.models
        teacher_hidden = [
            final_hidden(
                models.teacher, models.windows[start : start + self.recipe.ranking.batch_size].to(models.device)
            )
            for start in range(0, len(models.windows), self.recipe.ranking.batch_size)
        ]  # each (B, T, D): the teacher's side of every KL, computed once
        with progress(self.show_progress) as bar:
            task = bar.add_task("ranking: KL per layer", total=len(layers))
            for layer in layers:
                started = time.perf_counter()
                kl, nll = self._one_layer_logits(layer, teacher_hidden)
                scores = self.scores(layer)
                scores.update(kl=kl, ppl=math.exp(nll), seconds_kl=time.perf_counter() - started)
                self._write_scores(layer, scores)
                bar.advance(task)

    def _one_layer_logits(self, layer: int, teacher_hidden: list[torch.Tensor]) -> tuple[float, float]:
        """(KL(teacher ‖ student) per token, next-token NLL per prediction) on the held-out windows, the
        student being the teacher with ``layer`` replaced, run from the teacher's input to that layer."""
        models, adapter = self.models, self.models.adapter
        mixer = self.mixer_cls(adapter.geometry(models.teacher.config, layer), self.recipe.student.mixer.config)
        mixer.load_state_dict(load_file(self._weights(layer), device=str(models.device)))
        blocks = adapter.layers(models.teacher)
        attention = adapter.attention(blocks[layer])
        adapter.set_attention(blocks[layer], MixerLayer(mixer.to(models.device), layer))
        kl = nll = 0.0
        tokens = predictions = 0
        try:
            batch_size = self.recipe.ranking.batch_size
            for index, start in enumerate(range(0, len(models.windows), batch_size)):
                ids = models.windows[start : start + batch_size].to(models.device)
                hidden = self._run_from(layer, ids)
                targets = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100).flatten()
                batch_kl, batch_nll = chunk_kd(
                    models.teacher,
                    models.teacher,
                    hidden.flatten(0, 1),
                    teacher_hidden[index].flatten(0, 1),
                    targets,
                    1.0,
                )
                kl, nll = kl + batch_kl.item(), nll + batch_nll.item()
                tokens, predictions = tokens + ids.numel(), predictions + ids[:, 1:].numel()
        finally:
            adapter.set_attention(blocks[layer], attention)
        return kl / tokens, nll / predictions

    def _run_from(self, layer: int, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids → (B, T, D) final hidden states of the teacher as it is now (``layer`` replaced), the
        blocks before ``layer`` skipped: their output is the teacher's, recorded by one partial forward."""
        models, adapter = self.models, self.models.adapter
        trace = trace_teacher(models.teacher, adapter, ids, record={"block_inputs"}, layers={layer})
        hidden = trace.block_inputs[layer]
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
        for index, block in enumerate(adapter.layers(models.teacher)[layer:], start=layer):
            rotary = adapter.rotary(models.teacher, hidden, positions, index)
            hidden = adapter.run_block(block, hidden, rotary, positions)
        return adapter.final_norm(models.teacher)(hidden)


def progress(show: bool):
    """A Rich progress bar on stderr (disabled when ``show`` is false)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=stderr_console,
        disable=not show,
    )


def ranking_folder(recipe: Recipe) -> Path:
    """The cache folder of ``recipe``'s ranking key (created if missing)."""
    return cache_dir("rankings", ranking_key(recipe))


def rank_layers(
    recipe: Recipe,
    models: Models,
    measures: list[str],
    layers: list[int] | None = None,
    fresh: bool = False,
    show_progress: bool = True,
) -> dict:
    """Rank ``layers`` (default: all) by ``measures``, reusing the cached per-layer results unless ``fresh``;
    returns what ranking.json holds (also written, with ranking.md, into the cache folder)."""
    unknown = sorted(set(measures) - set(RANKING_MEASURES))
    if unknown:
        raise UserError(f"unknown measure(s) {unknown}; choose from {', '.join(RANKING_MEASURES)}")
    folder = ranking_folder(recipe)
    if fresh:
        shutil.rmtree(folder)
        folder.mkdir(parents=True)
    ranking = LayerRanking(recipe, models, folder, show_progress)
    layers = sorted(set(layers)) if layers is not None else list(range(ranking.layer_count))
    scores = ranking.run(layers, measures)
    result = summarise(recipe, scores, measures, folder, int(models.windows.numel()))
    write_outputs(result, folder)
    return result


def summarise(recipe: Recipe, scores: dict[int, dict], measures: list[str], folder: Path, heldout: int) -> dict:
    """The ranking.json content: per-layer measures, each measure's order (costliest first), ρ against KL."""
    layers = sorted(scores)
    order = {m: sorted(layers, key=lambda layer: -scores[layer][m]) for m in RANKING_MEASURES if m in measures}
    kl = [scores[layer]["kl"] for layer in layers] if "kl" in measures else None
    agreement = {m: spearman([scores[layer][m] for layer in layers], kl) for m in order if kl is not None and m != "kl"}
    log = folder / "alignment.json"
    alignments = json.loads(log.read_text()) if log.is_file() else []
    return {
        "recipe": recipe.name,
        "key": folder.name,
        "mixer": recipe.resolved()["student"]["mixer"],
        "settings": recipe.ranking.model_dump(mode="json"),
        "heldout_tokens": heldout,
        "measures": [m for m in RANKING_MEASURES if m in measures],
        "layers": {str(layer): scores[layer] for layer in layers},
        "order": order,
        "spearman_vs_kl": agreement,
        "seconds": {
            "alignment": sum(entry["seconds"] for entry in alignments),
            "local_measures": sum(scores[layer].get("seconds_local", 0.0) for layer in layers),
            "kl_and_ppl": sum(scores[layer].get("seconds_kl", 0.0) for layer in layers),
        },
        "cache": str(folder),
    }


def most_costly(result: dict, measure: str, count: int) -> list[int]:
    """The ``count`` layers whose replacement costs most by ``measure``, in layer order."""
    return sorted(result["order"][measure][:count])


def write_outputs(result: dict, directory: Path) -> None:
    """ranking.json, ranking.md and ranking.png into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    write_text_atomic(directory / RANKING_FILE, json.dumps(result, indent=2) + "\n")
    write_text_atomic(directory / "ranking.md", render_markdown(result))
    plot_ranking(result, directory / "ranking.png")


DESCRIPTIONS = {
    "kl": "KL(teacher ‖ student) per token, nats",
    "ppl": "perplexity of the student",
    "stage1": "stage-1 distance ‖A − M‖_F",
    "stage2": "stage-2 distance",
}


def render_markdown(result: dict) -> str:
    """A table (one row per layer, one column per measure with its rank) and the proxies' agreement with KL."""
    measures = result["measures"]
    settings = result["settings"]
    lines = [
        f"# Layer ranking: {result['recipe']}",
        "",
        f"Each layer replaced alone by `{result['mixer']['name']}` (transferred, then {settings['tokens']} tokens of "
        f"layer-local stage 2), measured on {result['heldout_tokens']} held-out tokens. Rank 1 = the layer whose "
        "replacement costs most (the first to keep attention).",
        "",
        "| layer | " + " | ".join(f"{m} (rank)" for m in measures) + " |",
        "|---|" + "---|" * len(measures),
    ]
    for layer, scores in result["layers"].items():
        cells = [f"{scores[m]:.4g} ({result['order'][m].index(int(layer)) + 1})" for m in measures]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    if result["spearman_vs_kl"]:
        lines += ["", "Agreement of each proxy with the KL ranking (Spearman ρ):", ""]
        lines += [
            f"- {m}: {rho:.3f}" if rho is not None else f"- {m}: –" for m, rho in result["spearman_vs_kl"].items()
        ]
    seconds = result["seconds"]
    lines += [
        "",
        f"Time: alignment {seconds['alignment']:.0f} s, stage-1/2 measures {seconds['local_measures']:.0f} s, "
        f"KL and perplexity {seconds['kl_and_ppl']:.0f} s.",
    ]
    return "\n".join(lines) + "\n"


def plot_ranking(result: dict, path: Path) -> None:
    """One bar chart per measure: its value for each layer."""
    from mixerdistill.plots import pyplot

    plt = pyplot()
    measures = result["measures"]
    layers = [int(layer) for layer in result["layers"]]
    figure, axes = plt.subplots(len(measures), 1, figsize=(max(4.0, 0.35 * len(layers) + 2), 2.2 * len(measures)))
    for axis, measure in zip(axes if len(measures) > 1 else [axes], measures):
        axis.bar(layers, [result["layers"][str(layer)][measure] for layer in layers])
        axis.set_ylabel(measure)
        axis.set_xticks(layers)
        axis.set_title(DESCRIPTIONS[measure], fontsize="small")
    axes_list = axes if len(measures) > 1 else [axes]
    axes_list[-1].set_xlabel("layer replaced")
    figure.suptitle(f"Cost of replacing each layer, {result['recipe']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
