"""The tutorial adapter's own tests: check_adapter on tiny random StarCoder2 models, and the transfer
check's error when the adapter is not the family's."""

import pytest

from mixerdistill.plugins import get_teacher_adapter
from mixerdistill.testing import check_adapter, tiny_model
from mixerdistill.transfer_check import TransferMismatch

TINY = dict(num_key_value_heads=2, sliding_window=6)  # grouped kv heads; a window shorter than 12 tokens


@pytest.mark.parametrize(
    "options",
    [{}, {"use_bias": False}, {"num_key_value_heads": 4, "sliding_window": None}],
    ids=["biases-window", "no-biases", "full-attention"],
)
def test_reproduces_its_teacher(options):
    report = check_adapter("starcoder2", model=tiny_model("starcoder2", **{**TINY, **options}))
    assert report.adapter == "starcoder2"  # found by model_type: the entry point registered it
    assert max(report.differences.values()) <= 1e-5


def test_the_llama_adapter_stops_at_the_transfer_check():
    model = tiny_model("starcoder2", **TINY)
    with pytest.raises(TransferMismatch) as caught:
        check_adapter("starcoder2", get_teacher_adapter("llama"), model=model)
    message = str(caught.value)
    assert "teacher adapter 'llama' does not reproduce layer 0 of this starcoder2 teacher" in message
    assert "first differing piece: reading the projections" in message and "biases" in message
    assert "the adapter for model_type 'starcoder2' is 'starcoder2'" in message


def test_without_biases_the_llama_adapter_is_exact():
    model = tiny_model("starcoder2", **TINY, use_bias=False)
    assert check_adapter("starcoder2", get_teacher_adapter("llama"), model=model).adapter == "llama"
