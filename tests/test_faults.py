"""Environment faults and safe loading: unwritable output, teachers that cannot be loaded, what
`trust_remote_code` and safetensors-only loading pass to transformers."""

from __future__ import annotations

import pytest
import transformers

from conftest import REPO, cli_in_process
from mixerdistill.errors import UserError
from mixerdistill.recipe import validate_recipe
from mixerdistill.teacher_sources import load_teacher

TINY = str(REPO / "recipes" / "tiny.yaml")


def test_unwritable_output_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, text = cli_in_process(
        "run", TINY, "--output", str(blocker / "run"), "--no-progress", "--set", "stages=[]", "--set", "eval.tokens=0"
    )
    assert code == 2 and "Traceback" not in text
    assert f"cannot write {blocker / 'run'}: Not a directory" in text and "--resume" in text
    assert blocker.read_text() == ""


def teacher_spec(source: str, **fields):
    data = {
        "name": "t",
        "teacher": {"source": source, **fields},
        "student": {"mixer": {"name": "discrete_mamba2"}},
        "data": {"source": "text", "paths": [str(REPO / "README.md")]},
    }
    return validate_recipe(data).teacher


class _Stop(Exception):
    """Ends load_teacher once the model loader has been called."""


def record_calls(monkeypatch, error: Exception | None = None) -> dict[str, dict]:
    """Replace the transformers loaders by fakes that record their keyword arguments."""
    calls: dict[str, dict] = {}

    def fake(kind):
        def from_pretrained(where, **options):
            calls[kind] = options
            if error is not None:
                raise error
            if kind == "model":
                raise _Stop

        return from_pretrained

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake("tokenizer"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake("model"))
    return calls


@pytest.mark.parametrize(
    "source, fields, trusted",
    [
        ("hub", {"name": "org/model"}, False),
        ("hub", {"name": "org/model", "trust_remote_code": True}, True),
        ("local", {"path": str(REPO / "docs")}, False),
    ],
)
def test_remote_code_only_when_the_recipe_allows_it(monkeypatch, source, fields, trusted):
    calls = record_calls(monkeypatch)
    with pytest.raises(_Stop):
        load_teacher(teacher_spec(source, **fields))
    assert calls["tokenizer"]["trust_remote_code"] is trusted
    assert calls["model"]["trust_remote_code"] is trusted
    assert calls["model"]["use_safetensors"] is True


def test_interrupted_download_is_a_clear_error(monkeypatch):
    record_calls(monkeypatch, OSError("Connection broken: IncompleteRead(1000 bytes read, 2000 more expected)"))
    with pytest.raises(UserError, match="cannot load 'org/model'.*resumes when you run again.*IncompleteRead"):
        load_teacher(teacher_spec("hub", name="org/model"))


def test_missing_gguf_teacher_package_is_named_by_the_recipe_path():
    with pytest.raises(UserError) as caught:
        teacher_spec("gguf_package", package="no-such-teacher-package", file="model.gguf")
    message = str(caught.value)
    assert "teacher: " in message and "'no-such-teacher-package' is not installed" in message
