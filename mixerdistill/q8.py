"""A tied embedding held as 8-bit blocks: GGUF's Q8_0 layout, for teachers whose embedding is stored that way.

A Q8_0 tensor keeps, for every 32 consecutive values of a row, 32 int8 codes and one scale; a value is
``code × scale``. A GGUF teacher with a Q8_0 embedding (Gemma-3-270m's 262,144 × 640) dequantises to float32
values that are exactly such products, so the same values fit in a quarter of the memory (0.18 GB instead of
0.67 GB). ``keep_q8_embedding`` recovers the codes from the float32 checkpoint, checks that every value comes
back bit for bit, and swaps the model's input embedding and its tied LM head for ``Q8Embedding`` /
``Q8LMHead``, which dequantise a slice of rows at a time. The embedding is frozen: its codes cannot learn.

``float_embedding`` puts the ordinary modules back (export), ``q8_structure`` gives a freshly built model
the Q8 modules' shapes so that a checkpoint written by one loads into it.
"""

from __future__ import annotations

import torch
from safetensors import safe_open
from torch import nn

from mixerdistill.errors import UserError

BLOCK = 32  # values per scale, as in GGUF's Q8_0
ROWS = 1024  # rows dequantised at a time: 1024 × 640 float32 is 2.6 MB, which stays in the CPU cache


def dequantize(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(…, D) int8 codes and (…, D / BLOCK) float32 scales → (…, D) float32 values."""
    return _dequantize_into(torch.empty(codes.shape), codes, scales)


def quantize_exactly(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(n, D) float32 values → (codes, scales) such that ``dequantize`` gives them back bit for bit, or None when
    they are not Q8_0 products. Q8_0 puts ±127 at each block's largest magnitude, so scale = max |value| / 127."""
    blocks = values.float().unflatten(-1, (-1, BLOCK))
    scales = blocks.abs().amax(-1) / 127
    codes = (blocks / scales.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)).round()
    codes = codes.clamp(-127, 127).to(torch.int8).flatten(-2)
    if not torch.equal(dequantize(codes, scales), values.float()):
        return None
    return codes, scales


class Q8Embedding(nn.Module):
    """Embedding lookup on Q8_0 codes: (…) token ids → (…, D), then the family's scale (Gemma 3's √D)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, float_module: nn.Module):
        super().__init__()
        self.num_embeddings, self.embedding_dim = codes.shape
        self.padding_idx = getattr(float_module, "padding_idx", None)
        self.codes = nn.Parameter(codes, requires_grad=False)
        self.scales = nn.Parameter(scales, requires_grad=False)
        self.dtype = float_module.weight.dtype
        scale = getattr(float_module, "embed_scale", None)  # Gemma 3's √D, a buffer
        self.register_buffer("embed_scale", None if scale is None else scale.clone(), persistent=False)
        # The float module with its weight on the meta device (no memory), for float_embedding; kept out of the
        # module tree so that it is in no state_dict.
        object.__setattr__(self, "float_module", float_module)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = dequantize(self.codes[input_ids], self.scales[input_ids]).to(self.dtype)
        if self.embed_scale is not None:
            rows = rows * self.embed_scale.to(self.dtype)
        return rows


def _dequantize_into(buffer: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """code × scale of (n, …, D) ``codes`` and (n, …, D / BLOCK) ``scales``, written into the first n rows of
    ``buffer`` (no allocation); those rows. The one place the Q8_0 formula is written."""
    weight = buffer[: len(codes)]
    weight.copy_(codes)
    weight.unflatten(-1, (-1, BLOCK)).mul_(scales.unsqueeze(-1))
    return weight


class _Q8MatMul(torch.autograd.Function):
    """(N, D) hidden states @ dequantised (V, D)ᵀ → (N, V), ROWS rows dequantised at a time into one buffer; the
    backward gives the hidden states' gradient (the codes are frozen)."""

    @staticmethod
    def forward(ctx, hidden, codes, scales):
        ctx.save_for_backward(codes, scales)
        logits = hidden.new_empty(hidden.shape[0], codes.shape[0])
        buffer = hidden.new_empty(min(ROWS, codes.shape[0]), codes.shape[1])
        for start in range(0, codes.shape[0], ROWS):
            weight = _dequantize_into(buffer, codes[start : start + ROWS], scales[start : start + ROWS])
            torch.mm(hidden, weight.T, out=logits[:, start : start + ROWS])
        return logits

    @staticmethod
    def backward(ctx, grad_logits):
        codes, scales = ctx.saved_tensors
        grad_hidden = grad_logits.new_zeros(grad_logits.shape[0], codes.shape[1])
        buffer = grad_logits.new_empty(min(ROWS, codes.shape[0]), codes.shape[1])
        for start in range(0, codes.shape[0], ROWS):
            weight = _dequantize_into(buffer, codes[start : start + ROWS], scales[start : start + ROWS])
            grad_hidden.addmm_(grad_logits[:, start : start + ROWS], weight)
        return grad_hidden, None, None


class Q8LMHead(nn.Module):
    """The LM head tied to a ``Q8Embedding``: (…, D) → (…, V) logits. It owns no parameters (the embedding does)."""

    def __init__(self, embedding: Q8Embedding, float_module: nn.Module):
        super().__init__()
        object.__setattr__(self, "embedding", embedding)  # tied, not a second copy in the state_dict
        object.__setattr__(self, "float_module", float_module)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        flat = _Q8MatMul.apply(hidden.reshape(-1, hidden.shape[-1]), self.embedding.codes, self.embedding.scales)
        return flat.view(*hidden.shape[:-1], -1)


def _tied_modules(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or head.weight is not embedding.weight or getattr(head, "bias", None) is not None:
        raise UserError(
            "teacher.embedding_storage: q8_0 needs an LM head tied to the input embedding, without bias; "
            f"{type(model).__name__} has another"
        )
    return embedding, head


def _install(model: nn.Module, codes: torch.Tensor, scales: torch.Tensor) -> None:
    """Swap ``model``'s tied embedding and LM head for Q8 modules over ``codes`` / ``scales``."""
    embedding, head = _tied_modules(model)
    shape, dtype = embedding.weight.shape, embedding.weight.dtype
    embedding.weight = nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"), requires_grad=False)
    head.weight = embedding.weight
    q8_embedding = Q8Embedding(codes, scales, embedding)
    model.set_input_embeddings(q8_embedding)
    model.set_output_embeddings(Q8LMHead(q8_embedding, head))
    # The head has no weight to tie any more: transformers' tie_weights (which lm-eval calls) must find no pair.
    model._tied_weights_keys = {}
    model.all_tied_weights_keys = {}


def keep_q8_embedding(model: nn.Module, safetensors_file, tensor_name: str) -> None:
    """Hold ``model``'s tied embedding (the float32 tensor ``tensor_name`` of ``safetensors_file``, read slice by
    slice outside the model's own mapping of the file) as Q8_0 blocks; a UserError names the first row whose
    values are not Q8_0 products."""
    embedding, _ = _tied_modules(model)
    rows, width = embedding.weight.shape
    if width % BLOCK or embedding.weight.dtype != torch.float32:
        raise UserError(
            f"teacher.embedding_storage: q8_0 needs a float32 embedding whose width is a multiple of {BLOCK}; "
            f"this one is {embedding.weight.dtype} of width {width}"
        )
    codes = torch.empty(rows, width, dtype=torch.int8)
    scales = torch.empty(rows, width // BLOCK)
    with safe_open(str(safetensors_file), framework="pt") as stored:
        source = stored.get_slice(tensor_name)
        for start in range(0, rows, ROWS):
            exact = quantize_exactly(source[start : start + ROWS])
            if exact is None:
                raise UserError(
                    f"teacher.embedding_storage: q8_0: the embedding's rows {start}…{start + ROWS - 1} are not "
                    "8-bit blocks (int8 × one scale per 32 values) exactly; keep embedding_storage: float"
                )
            codes[start : start + ROWS], scales[start : start + ROWS] = exact
    probe = torch.tensor([0, rows // 2, rows - 1])
    with torch.no_grad():
        expected = embedding(probe)  # three rows of the mapped file
        _install(model, codes, scales)
        if not torch.equal(model.get_input_embeddings()(probe), expected):
            raise UserError(
                f"teacher.embedding_storage: q8_0: {type(embedding).__name__} computes more than a (scaled) "
                "lookup; keep embedding_storage: float"
            )


def q8_structure(model: nn.Module) -> None:
    """Give a freshly built ``model`` Q8 modules of its embedding's shape (zeros), to load a checkpoint into."""
    embedding, _ = _tied_modules(model)
    rows, width = embedding.weight.shape
    _install(model, torch.zeros(rows, width, dtype=torch.int8), torch.zeros(rows, width // BLOCK))


def float_embedding(model: nn.Module) -> None:
    """Put back ``model``'s own embedding and tied LM head, with the dequantised weights (no-op without Q8)."""
    q8 = model.get_input_embeddings()
    if not isinstance(q8, Q8Embedding):
        return
    head = model.get_output_embeddings()
    weight = dequantize(q8.codes, q8.scales).to(q8.dtype)
    q8.float_module.weight = nn.Parameter(weight, requires_grad=False)
    head.float_module.weight = q8.float_module.weight
    model.set_input_embeddings(q8.float_module)
    model.set_output_embeddings(head.float_module)
    del model._tied_weights_keys  # the class's pairs again
    model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=False)
