"""Run by tests/test_export.py in a fresh virtualenv holding only torch and transformers (no mixerdistill).

    python export_check.py REQUEST.json RESULTS.pt

REQUEST: {"folders": {name: exported folder}, "ids": (B, T) token ids, "new_tokens": n,
          "padded": [[ids of a short prompt], [ids of a long prompt]], "pad_token_id": id,
          "padding": [names], "round_trip": [names], "dtype_check": [names]}
RESULTS: {name: {"logits", "greedy", "state_bytes", "padded_batch", "padded_alone", "round_trip_diff",
          "bf16_dtypes", "device_map_diff", "load_seconds"}, "__mixerdistill_importable__": bool}
"""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM


def load(folder: str, **kwargs):
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, **kwargs).eval()


def state_bytes(cache) -> int:
    """Bytes of the mixer states in a generation cache (its MixerCacheLayer entries)."""
    return sum(
        t.nbytes
        for entry in cache.layers
        if type(entry).__name__ == "MixerCacheLayer"
        for t in (entry.state or {}).values()
    )


def greedy(model, ids: torch.Tensor, new_tokens: int, **kwargs):
    return model.generate(
        ids,
        attention_mask=kwargs.pop("attention_mask", torch.ones_like(ids)),
        max_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=None,
        **kwargs,
    )


@torch.no_grad()
def check(name: str, folder: str, request: dict) -> dict:
    started = time.perf_counter()
    model = load(folder)
    result = {"load_seconds": time.perf_counter() - started}
    ids = torch.tensor(request["ids"])
    result["logits"] = model(input_ids=ids).logits
    n = request["new_tokens"]
    result["greedy"] = greedy(model, ids, n)[:, ids.shape[1] :]
    result["state_bytes"] = [
        state_bytes(greedy(model, ids, count, return_dict_in_generate=True).past_key_values) for count in (2, n)
    ]
    if name in request["padding"]:
        short, long = request["padded"]
        pad = request["pad_token_id"]
        batch = torch.tensor([[pad] * (len(long) - len(short)) + short, long])
        mask = torch.tensor([[0] * (len(long) - len(short)) + [1] * len(short), [1] * len(long)])
        result["padded_batch"] = greedy(model, batch, n, attention_mask=mask, pad_token_id=pad)[:, batch.shape[1] :]
        result["padded_alone"] = [
            greedy(model, torch.tensor([p]), n, pad_token_id=pad)[0, len(p) :] for p in (short, long)
        ]
    if name in request["round_trip"]:
        with tempfile.TemporaryDirectory() as copy:
            model.save_pretrained(copy)
            again = load(copy)
            result["round_trip_diff"] = (again(input_ids=ids).logits - result["logits"]).abs().max().item()
    if name in request["dtype_check"]:
        half = load(folder, dtype=torch.bfloat16)
        result["bf16_dtypes"] = sorted({str(p.dtype) for p in half.parameters()})
        result["bf16_finite"] = bool(half(input_ids=ids[:, :4]).logits.isfinite().all())
        placed = load(folder, device_map="cpu")
        result["device_map_diff"] = (placed(input_ids=ids).logits - result["logits"]).abs().max().item()
    return result


def main() -> None:
    request = json.loads(open(sys.argv[1]).read())
    torch.manual_seed(0)
    results = {name: check(name, folder, request) for name, folder in request["folders"].items()}
    results["__mixerdistill_importable__"] = importlib.util.find_spec("mixerdistill") is not None
    torch.save(results, sys.argv[2])


if __name__ == "__main__":
    main()
