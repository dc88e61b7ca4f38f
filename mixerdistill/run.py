"""A run: teacher → student → stages → report, in one output directory (layout: mixerdistill.run_directory).

``Distillation`` holds the run's state and names its phases, in the order ``execute`` calls them::

    setup()         teacher + adapter, data, student, the resolved recipe, the report's first figures
    run_stage(i)    stage i: finished earlier (load it), or train it from its resume point or from the start
    evaluate()      final perplexity, greedy samples, lm-eval scores
    finish()        plots, wall time, the last write of report.json / report.md

A finished stage (its checkpoint is complete) is never redone when the run is resumed; the stage in
progress continues from its newest complete mid-stage checkpoint, and gives bitwise the same weights
as an uninterrupted run on the same machine.

Under torchrun every rank runs every phase: the ranks train together (mixerdistill.distributed), all of
them evaluate perplexity, and rank 0 alone logs and writes files (the others wait at a barrier). Rank 0
alone takes the samples and lm-eval scores; the other ranks' report lacks them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mixerdistill import interrupt
from mixerdistill.checkpoint import (
    PROGRESS_DIR,
    ResumePoint,
    StageProgress,
    finished_stage,
    load_weights,
    save_checkpoint,
)
from mixerdistill.console import stderr_console
from mixerdistill.device import pick_device
from mixerdistill.distributed import plans
from mixerdistill.distributed import world as worlds
from mixerdistill.domains import DomainEvaluation, domain_table
from mixerdistill.errors import UserError, writing
from mixerdistill.evaluation import greedy_continuation, perplexity
from mixerdistill.lock import output_lock
from mixerdistill.memory import peak_rss_gb, release_freed_memory
from mixerdistill.mixture import MixedData, build_data
from mixerdistill.plots import write_run_plots
from mixerdistill.plugins import get_mixer, get_stage
from mixerdistill.recipe import KeepAttentionAuto, Recipe
from mixerdistill.report import write_report
from mixerdistill.run_directory import METRICS_FILE, check_output, check_same_recipe, prepare_output, stage_directory
from mixerdistill.run_report import (
    CurvePoint,
    DataFigures,
    RunReport,
    Samples,
    StageFigures,
    StudentFigures,
    TeacherFigures,
)
from mixerdistill.stages import StageContext
from mixerdistill.student import StudentSpec, build_student, mixer_counts, mixer_layers
from mixerdistill.teacher import find_adapter
from mixerdistill.teacher_sources import load_teacher
from mixerdistill.training import Checkpointing, Placement, Reporting, seed_everything, train_stage, truncate


def execute(
    recipe: Recipe, output: Path, resume: bool = False, overwrite: bool = False, show_progress: bool = True
) -> RunReport:
    """Run every stage of ``recipe`` into ``output`` and return the report (on every rank).

    The output directory is locked for the whole run (mixerdistill.lock); SIGINT, SIGTERM and SIGUSR1
    end it after the step in progress with a checkpoint and raise interrupt.Interrupted.
    """
    world, device = worlds.start(recipe.distributed, pick_device(recipe.device))
    try:
        with output_lock(Path(output), world), interrupt.stop_signals(world.main):  # issue 20
            run = Distillation(
                recipe, Path(output), world, device, resume=resume, overwrite=overwrite, show_progress=show_progress
            )
            run.setup()
            for index in range(1, len(recipe.stages) + 1):
                release_freed_memory(collect=True)  # the last phase's leftovers are not the next one's floor
                run.run_stage(index)
            release_freed_memory(collect=True)
            run.evaluate()
            release_freed_memory(collect=True)  # before the plots: matplotlib's figures on lm-eval's leftovers
            return run.finish()
    finally:
        worlds.stop(world)


@dataclass
class ResumeState:
    """Where stage i starts: finished earlier (its checkpoint's manifest), mid-stage (a progress
    checkpoint), or from its first step (both None)."""

    finished: dict | None = None
    point: ResumePoint | None = None


class Distillation:
    """One run of a recipe into an output directory; see the module docstring for the phases."""

    def __init__(
        self,
        recipe: Recipe,
        output: Path,
        world: worlds.World = worlds.SINGLE,
        device: torch.device | None = None,
        resume: bool = False,
        overwrite: bool = False,
        show_progress: bool = True,
    ):
        self.recipe, self.output, self.world = recipe, output, world
        self.device = device or pick_device(recipe.device)
        self.resume, self.overwrite, self.show_progress = resume, overwrite, show_progress
        self.log = stderr_console.print if world.main else _silent
        self.first_trained: int | None = None  # the first stage this invocation trains (None: none yet)
        self.metrics_bytes = 0  # where the metrics of the next stage begin in metrics.jsonl

    # -- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        """Check everything that can reject the run, load teacher and data, build the student, record
        the resolved recipe and the first figures. Nothing is written before the checks pass."""
        recipe = self.recipe
        plans.check_batch_sizes(recipe, self.world)
        check_output(self.output, self.resume, self.overwrite)
        self.world.barrier()  # every rank has looked at the output directory before rank 0 writes to it
        if recipe.threads:
            torch.set_num_threads(recipe.threads)
        self.started = time.perf_counter()
        self._load_teacher()
        self._load_data()
        self._resolve_keep_attention()
        self._build_student()
        self.recipe = self._resolve_stages()
        if self.resume and (self.output / "recipe.yaml").is_file():
            check_same_recipe(self.output, self.recipe.resolved())
        if self.world.main:
            prepare_output(self.output, self.recipe.resolved(), self.overwrite)
            with writing(self.output / "tokenizer"):
                self.tokenizer.save_pretrained(self.output / "tokenizer")
        self.log(f"[bold]student[/]: {', '.join(f'{n} × {k}' for k, n in self.counts.items())}")
        self._start_report(RunReport.read_if_present(self.output) if self.resume else None)

    def _load_teacher(self) -> None:
        self.log(f"[bold]teacher[/]: loading ({self.recipe.teacher.source})")
        self.teacher, self.tokenizer = load_teacher(self.recipe.teacher)
        self.teacher.to(self.device)
        self.adapter = find_adapter(self.teacher.config, self.recipe.teacher.adapter)

    def _load_data(self) -> None:
        recipe = self.recipe
        self.log("[bold]data[/]: tokenising")
        # One source or a weighted mixture (teacher_samples are made or read from the cache here); the
        # unseen domains of eval.domains, refused when one of them is in the training stream.
        self.data, sources = build_data(
            recipe.data,
            self.tokenizer,
            self.teacher,
            recipe.teacher.model_dump(mode="json"),
            self.show_progress and self.world.main,
        )
        self.data.check_batches(recipe.stages)  # issue 20: every stage gets full batches, known before training
        self.domain_eval = DomainEvaluation.for_recipe(
            recipe, self.data, sources, self.tokenizer, self.teacher, self.device, self.show_progress
        )
        self.eval_windows = (
            self.data.heldout_windows(recipe.eval.seq_len, recipe.eval.tokens) if recipe.eval.tokens else None
        )

    def _resolve_keep_attention(self) -> None:
        """``keep_attention: {auto: K, by}`` → the K layers whose replacement costs most by a layer ranking
        (mixerdistill.ranking), read from the cache or measured now; the recipe from here on holds the list."""
        auto = self.recipe.student.keep_attention
        self.keep_attention_by = None
        if not isinstance(auto, KeepAttentionAuto):
            return
        from mixerdistill.ranking import Models, most_costly, rank_layers

        count = len(self.adapter.layers(self.teacher))
        if auto.auto >= count:
            raise UserError(
                f"student.keep_attention.auto: {auto.auto} layers would keep attention but the teacher has "
                f"{count}; choose K from 1 to {count - 1}"
            )
        spec = self.recipe.ranking
        windows = self.data.heldout_windows(spec.seq_len, spec.heldout_tokens)
        models = Models(self.teacher, self.adapter, windows, self.device, self.data)
        self.log(f"[bold]keep_attention[/]: ranking the layers by {auto.by} (cached after the first run)")
        if not self.world.main:
            self.world.barrier()  # rank 0 ranks first; the others then read its cached results
        result = rank_layers(self.recipe, models, [auto.by], show_progress=self.show_progress and self.world.main)
        if self.world.main:
            self.world.barrier()
        kept = most_costly(result, auto.by, auto.auto)
        self.log(f"[bold]keep_attention[/]: layers {kept} (by {auto.by}; ranking in {result['cache']})")
        student = self.recipe.student.model_copy(update={"keep_attention": kept})
        self.recipe = self.recipe.model_copy(update={"student": student})
        self.keep_attention_by = auto.by

    def _build_student(self) -> None:
        recipe, adapter = self.recipe, self.adapter
        mixer_name = recipe.student.mixer.name
        torch.manual_seed(recipe.seed)
        self.student = build_student(
            self.teacher,
            adapter,
            get_mixer(mixer_name),
            recipe.student.mixer.config,
            recipe.student.keep_attention,
            transfer=recipe.student.init == "transfer",
        )
        self.spec = StudentSpec(
            mixer=mixer_name,
            mixer_config=recipe.student.mixer.config.model_dump(mode="json"),
            keep_attention=sorted(recipe.student.keep_attention),
            adapter=adapter.name,
            teacher=recipe.teacher.model_dump(mode="json"),
            teacher_config=self.teacher.config.to_dict(),
        )
        self.counts = mixer_counts(self.student, adapter, mixer_name)
        self.context = StageContext(
            teacher=self.teacher, student=self.student, adapter=adapter, mixers=mixer_layers(self.student, adapter)
        )

    def _resolve_stages(self) -> Recipe:
        """The recipe with each stage's automatic choices made (``Stage.resolve``); recipe.yaml records it."""
        stages = [
            block.with_config(get_stage(block.name).resolve(block.config, self.context)) for block in self.recipe.stages
        ]
        return self.recipe.model_copy(update={"stages": stages})

    def _start_report(self, previous: RunReport | None) -> None:
        """The report's figures before training; the perplexities a resumed run measured already are kept."""
        self.report = RunReport(
            recipe=self.recipe.name,
            teacher=TeacherFigures(
                source=self.recipe.teacher.source,
                adapter=self.adapter.name,
                parameters=sum(p.numel() for p in self.teacher.parameters()),
                perplexity=previous.teacher.perplexity if previous else None,
            ),
            student=StudentFigures(
                mixers=self.counts,
                keep_attention=sorted(self.recipe.student.keep_attention) or None,
                keep_attention_by=self.keep_attention_by,
                parameters=sum(p.numel() for p in self.student.parameters()),
                perplexity_after_transfer=previous.student.perplexity_after_transfer if previous else None,
            ),
            data=DataFigures(
                train_tokens=self.data.train_tokens,
                heldout_tokens=len(self.data.heldout),
                eval_tokens=int(self.eval_windows.numel()) if self.eval_windows is not None else 0,
            ),
        )
        self.previous_eval = previous.eval if previous else None
        if isinstance(self.data, MixedData):
            self.report.data.mix = self.data.shares(self.recipe.stages, self.recipe.seed)
        if self.domain_eval:
            self.report.teacher.domains = (previous.teacher.domains if previous else None) or self.domain_eval.measure(
                self.teacher
            )
        if self.report.teacher.perplexity is None and self.eval_windows is not None:
            self.log("[bold]eval[/]: teacher perplexity")
            self.report.teacher.perplexity = self.measure(self.teacher)
        after_transfer = self.report.student.perplexity_after_transfer
        if self.recipe.eval.after_each_stage and after_transfer is None:
            self.log("[bold]eval[/]: student perplexity after transfer")
            self.report.student.perplexity_after_transfer = after_transfer = self.measure(self.student)
            if self.domain_eval:
                self.report.student.domains_after_transfer = self.domain_eval.measure(self.student)
        self._write_report()
        if self.recipe.eval.every_tokens and after_transfer:
            self.report.curve.append(CurvePoint(stage_index=0, tokens=0, perplexity=after_transfer))

    def measure(self, model: torch.nn.Module) -> float | None:
        """Held-out perplexity of ``model`` (None without eval windows)."""
        if self.eval_windows is None:
            return None
        return perplexity(model, self.eval_windows, self.recipe.eval.batch_size, self.device)

    # -- stages --------------------------------------------------------------------------------
    def resume_state(self, index: int) -> ResumeState:
        """Where stage ``index`` starts. Only a resumed run looks at earlier checkpoints, and only until
        the first stage it trains: the stages after that one start from their first step."""
        if not self.resume or self.first_trained is not None:
            return ResumeState()
        manifest = finished_stage(self._stage_directory(index), index)  # a damaged one is an error
        if manifest is not None and "stage" in manifest:
            return ResumeState(finished=manifest)
        return ResumeState(point=self._progress(index).latest())

    def run_stage(self, index: int) -> None:
        """Stage ``index`` (1-based): loaded when it finished earlier, else trained, checkpointed and reported."""
        block = self.recipe.stages[index - 1]
        state = self.resume_state(index)
        if state.finished is not None:
            self._load_finished_stage(index, state.finished)
            return
        self.first_trained = self.first_trained or index
        progress = self._progress(index)
        self.world.barrier()  # every rank has read the progress checkpoint before rank 0 may clear the folder
        if state.point is None and self.world.main:
            progress.clear()
            truncate(self.output / METRICS_FILE, self.metrics_bytes)
        if state.point is not None:
            self.log(
                f"[bold]stage {index}[/] {block.name}: resuming after step {state.point.step} "
                f"({state.point.directory.name})"
            )
            self.report.curve += [CurvePoint.model_validate(p) for p in state.point.info["curve"]]
        figures = self._train(index, progress, state.point)
        self.report.stages.append(figures)
        if self.world.main:
            self._save_stage(index, figures, progress)
        self.world.barrier()
        self.log(
            f"[bold]stage {index}[/] {block.name}: loss {figures.loss_first:.4g} → {figures.loss_last:.4g}, "
            f"{figures.tokens_per_second:.0f} tok/s"
            + (f", perplexity {figures.perplexity_after:.2f}" if figures.perplexity_after else "")
        )
        interrupt.end_stage(self.world)  # issue 20: a stop asked for in the stage's last step stops here

    def _stage_directory(self, index: int) -> Path:
        return stage_directory(self.output, index, self.recipe.stages[index - 1].name)

    def _progress(self, index: int) -> StageProgress:
        every = self.recipe.output.checkpoint
        return StageProgress(
            self.output / PROGRESS_DIR / self._stage_directory(index).name, every.every_steps, every.every_minutes
        )

    def _load_finished_stage(self, index: int, manifest: dict) -> None:
        directory = self._stage_directory(index)
        self.log(
            f"[bold]stage {index}[/] {self.recipe.stages[index - 1].name}: finished earlier, loading {directory.name}"
        )
        load_weights(self.student, directory)
        self.student.to(self.device)
        self.report.stages.append(StageFigures.model_validate(manifest["stage"]))
        self.report.curve += [CurvePoint.model_validate(p) for p in manifest["curve"]]
        self.metrics_bytes = manifest["metrics_bytes"]

    def _train(self, index: int, progress: StageProgress, point: ResumePoint | None) -> StageFigures:
        """Seed, data, plan and the training loop for stage ``index``; returns its figures."""
        block = self.recipe.stages[index - 1]
        config = block.config
        stage = get_stage(block.name)(config, self.context)
        seed = config.seed if config.seed is not None else self.recipe.seed + index
        seed_everything(seed)
        batches = self.data.train_batches(
            config.batch_size, config.seq_len, seed, start_batch=point.step if point else 0
        )
        plan = plans.plan_for(self.recipe, block, self.world, self.device)
        interrupt.begin_stage(index, point.step if point else 0)  # issue 20: a signal now ends the step
        self.log(
            f"[bold]stage {index}[/] {block.name}: {config.steps()} steps × {config.batch_size} × "
            f"{config.seq_len} tokens" + (f", {plan.describe()}" if self.world.active else "")
        )
        result = train_stage(
            stage,
            block.name,
            self.student,
            batches,
            Placement(self.device, plan, self.world),
            Reporting(self.output / METRICS_FILE, self.show_progress, self._curve_callback(index, plan)),
            Checkpointing(progress, point, lambda: {"curve": self._stage_curve_json(index)}),
        )
        return StageFigures(
            index=index,
            name=block.name,
            steps=result.steps,
            tokens=result.tokens,
            seconds=round(result.seconds, 3),
            tokens_per_second=round(result.tokens_per_second, 2),
            loss_first=result.loss_first,
            loss_last=result.loss_last,
            perplexity_after=self.measure(self.student) if self.recipe.eval.after_each_stage else None,
            domains_after=self.domain_eval.measure(self.student)
            if self.domain_eval and self.recipe.eval.after_each_stage
            else None,
            peak_rss_gb=peak_rss_gb(),
        )

    def _curve_callback(self, index: int, plan: plans.Plan):
        """An on_step callback adding held-out perplexity every ``eval.every_tokens`` training tokens
        (on every rank: the model may be sharded or spread over ranks)."""
        every = self.recipe.eval.every_tokens
        if not every or self.eval_windows is None:
            return None
        earlier = sum(s.config.tokens_rounded() for s in self.recipe.stages[: index - 1])
        config = self.recipe.stages[index - 1].config
        step_tokens = config.batch_size * config.seq_len

        def on_step(step: int, tokens: int) -> dict | None:
            if (earlier + tokens) // every == (earlier + tokens - step_tokens) // every:
                return None
            model = plan.evaluation_model(self.student)
            point = CurvePoint(
                stage_index=index,
                tokens=earlier + tokens,
                perplexity=self.measure(model),
                domains=self.domain_eval.measure(model) if self.domain_eval else None,
            )
            self.report.curve.append(point)
            return point.model_dump(include={"perplexity", "domains"}, exclude_none=True)

        return on_step

    def _stage_curve_json(self, index: int) -> list[dict]:
        return [point.model_dump() for point in self.report.stage_curve(index)]

    def _save_stage(self, index: int, figures: StageFigures, progress: StageProgress) -> None:
        """Rank 0: the stage's checkpoint (with its figures, so a resumed run reuses them) and the report."""
        self.metrics_bytes = (self.output / METRICS_FILE).stat().st_size
        if self.recipe.output.save_every_stage:
            save_checkpoint(
                self.student,
                self.spec,
                self._stage_directory(index),
                extra={
                    "stage": figures.model_dump(mode="json"),
                    "metrics_bytes": self.metrics_bytes,
                    "curve": self._stage_curve_json(index),
                },
            )
        progress.clear()
        self._write_report()

    # -- evaluation and the end ----------------------------------------------------------------
    def evaluate(self) -> None:
        """Final perplexity (every rank); greedy samples and lm-eval scores (rank 0)."""
        report, recipe = self.report, self.recipe
        last = report.stages[-1].perplexity_after if report.stages else None
        report.student.perplexity = last if last is not None else self.measure(self.student)
        if self.domain_eval:
            final = report.stages[-1].domains_after if report.stages else None
            report.student.domains, report.student.domain_ratio_geomean = domain_table(
                report.teacher.domains, final or self.domain_eval.measure(self.student)
            )
        if not self.world.main:
            return
        if recipe.eval.prompt:
            prompt, length = recipe.eval.prompt, recipe.eval.max_new_tokens
            report.samples = Samples(
                prompt=prompt,
                teacher=greedy_continuation(self.teacher, self.tokenizer, prompt, length, self.device),
                student=greedy_continuation(self.student, self.tokenizer, prompt, length, self.device),
            )
        benchmarks = recipe.eval.lm_eval
        if not benchmarks.tasks:
            return
        if self.previous_eval and self.first_trained is None:
            report.eval = self.previous_eval  # nothing was trained: the earlier scores still hold
            return
        from mixerdistill.harness import EvalSettings, evaluate_pair, lm_eval_limit

        settings = EvalSettings(
            tasks=benchmarks.tasks,
            limit=lm_eval_limit(benchmarks.limit),
            batch_size=benchmarks.batch_size,
            num_fewshot=benchmarks.num_fewshot,
        )
        release_freed_memory(collect=True)
        report.eval = evaluate_pair(
            self.student, self.teacher if benchmarks.with_teacher else None, self.tokenizer, settings
        )

    def finish(self) -> RunReport:
        """Rank 0: the transfer checkpoint of a run without stages, plots, wall time, the final report."""
        if not self.world.main:
            return self.report
        if not self.report.stages:
            save_checkpoint(self.student, self.spec, stage_directory(self.output, 0, "transfer"))
        self.report.plots = write_run_plots(self.output)
        self.report.seconds = round(time.perf_counter() - self.started, 2)
        self.report.peak_rss_gb = peak_rss_gb()
        self._write_report()
        return self.report

    def _write_report(self) -> None:
        if self.world.main:
            write_report(self.report, self.output)


def _silent(*args, **kwargs) -> None:
    """Logging on ranks other than 0."""
