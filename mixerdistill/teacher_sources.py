"""Loading a teacher (model + tokenizer) from any recipe source: config, hub, local folder, GGUF package."""

from __future__ import annotations

import torch

from mixerdistill.data import ByteTokenizer
from mixerdistill.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def config_from_dict(model_type: str, values: dict):
    """A transformers config of ``model_type`` built from keyword arguments."""
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(model_type, **values)
    except ValueError as error:
        raise UserError(f"teacher.model_type: {error}") from None


def load_teacher(spec):
    """(model in eval mode with gradients off, tokenizer) for a recipe ``teacher`` block."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = DTYPES[spec.dtype]
    if spec.source == "config":
        config = config_from_dict(spec.model_type, {"attn_implementation": "eager", **spec.config})
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        tokenizer = ByteTokenizer()
        if config.vocab_size < tokenizer.vocab_size:
            raise UserError(f"teacher.config.vocab_size is {config.vocab_size}; the byte tokenizer needs ≥ 256")
    elif spec.source in ("hub", "local"):
        where = spec.name if spec.source == "hub" else str(spec.path)
        if spec.source == "local" and not spec.path.is_dir():
            raise UserError(f"teacher.path: no such folder: {spec.path}")
        # Repository code runs only when the recipe says so; weights are read from safetensors only.
        options = {"trust_remote_code": spec.trust_remote_code if spec.source == "hub" else False}
        if spec.source == "hub":
            options["revision"] = spec.revision
        try:
            tokenizer = AutoTokenizer.from_pretrained(where, **options)
            model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, use_safetensors=True, **options)
        except OSError as error:
            raise UserError(
                f"teacher: cannot load '{where}' (mixerdistill reads teacher weights from "
                f"safetensors files only; an interrupted download resumes when you run again): "
                f"{error}"
            ) from None
    elif spec.source == "gguf_package":
        from mixerdistill.gguf_teacher import load_gguf_package_teacher

        model, tokenizer = load_gguf_package_teacher(
            spec.package, spec.file, dtype=dtype, q8_embedding=spec.embedding_storage == "q8_0"
        )
    else:  # the schema admits no other source
        raise AssertionError(spec.source)
    model.eval().requires_grad_(False)
    return model, compact_tokenizer(tokenizer)


def compact_tokenizer(tokenizer):
    """``tokenizer`` without the Python copies of its vocabulary and merges that some transformers classes
    (``GemmaTokenizer``, ``LlamaTokenizer``…) keep after building their Rust backend from them, which holds its
    own: 0.15 GB for Gemma 3's 262,144 tokens and 514,906 merges, for the whole run. Classes that read the
    copies again (their own ``save_vocabulary``) keep them."""
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    if (
        isinstance(tokenizer, TokenizersBackend)
        and type(tokenizer).save_vocabulary is TokenizersBackend.save_vocabulary
    ):
        for table in ("_vocab", "_merges"):
            tokenizer.__dict__.pop(table, None)
    return tokenizer
