"""The input embedding of a tied model whose LM head is quantized, and what the embedding's type decides.

With a tied, quantized head there is one quantized matrix, as in llama.cpp: :class:`QuantizedEmbedding`
gathers the rows a lookup needs from the head's own tensors (or, once the head is packed for its kernel,
from the checkpoint file). A module of its own because it is not a matmul layer: the decoder, the loader
and the benchmark ask it (:func:`embedding_dtype`, :func:`embedding_row_bytes`) what dtype and how many
bytes a lookup produces, whatever the table is.
"""

from __future__ import annotations

import torch
from torch import nn

from mobillama.errors import MobiLlamaError
from mobillama.infer.quant_layers import PROJECT_KERNELS, Int8Linear, QuantizedLinear


def check_token_ids(flat: torch.Tensor, rows: int) -> None:
    """Raise IndexError for an id outside [0, rows): a row reader indexing by hand (a file, a packed
    matrix with padding rows) would otherwise read past the table or a padding row silently."""
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= rows):
        raise IndexError(f"token id out of range for an embedding of {rows} rows")


class PackedRows(nn.Module):
    """Rows of a quantized matrix read back from the vnni kernel's packed layout, in the portable form
    (int8 codes, or two 4-bit codes per byte, even column low): the embedding lookups of a tied head that
    the kernel holds, so memory keeps one copy of the matrix (a model quantized on the fly has no file to
    read them from). Layout: :mod:`mobillama.kernels.packing` (blocks of 16 rows, 64-byte chunks of 4
    int8 columns, or of 4 + 4 int4 columns in the low and high nibbles)."""

    def __init__(self, packed: torch.Tensor, rows: int, cols: int, bits: int) -> None:
        super().__init__()
        per_chunk = 4 if bits == 8 else 8
        self.blocks = packed.view(-1, cols // per_chunk, 16, 4)  # a view: no copy of the matrix
        self.num_embeddings, self.bits = rows, bits

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        check_token_ids(flat, self.num_embeddings)
        chunks = self.blocks[flat // 16, :, flat % 16, :]  # [n, K / per_chunk, 4]
        if self.bits == 8:
            return torch.bitwise_xor(chunks, 0x80).view(torch.int8).reshape(*ids.shape, -1)
        q = torch.cat([chunks & 0x0F, chunks >> 4], dim=-1).reshape(len(flat), -1)  # columns in order
        return (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(*ids.shape, -1)


class QuantizedEmbedding(nn.Module):
    """The input embedding of a tied model whose LM head is quantized: the head's matrix, read by rows.

    One quantized copy serves both, as in llama.cpp: the head runs it through its kernel, and a lookup
    gathers only the rows it needs (``weight``, ``scales``, ``zeros`` are the head's own portable tensors)
    and dequantizes them to ``dtype``, the same numbers as the head's :meth:`~QuantizedLinear.dequantize`.
    Once the head has repacked its weight for a kernel, ``rows`` supplies the codes instead and the
    portable weight is freed, so memory holds the matrix once: :class:`PackedRows` over the vnni kernel's
    matrix (set by :func:`~mobillama.infer.quant.pack_for_inference`), else a
    :class:`~mobillama.infer.load.FileRowEmbedding` over the checkpoint's stored rows (set by
    :func:`~mobillama.infer.load.serve_embedding_from_file`; the stock int4 and fbgemm layouts cannot be
    read back by rows).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        bits: int,
        group_size: int | None = None,
        dtype: torch.dtype = torch.bfloat16,
        device=None,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.bits, self.group_size, self.dtype = bits, group_size, dtype
        V, K = num_embeddings, embedding_dim
        if bits == 8:  # a scale per row, or per group of group_size columns
            scales = (V,) if group_size is None else (V, K // group_size)
            self.register_buffer("weight", torch.empty(V, K, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.empty(scales, dtype=torch.float32, device=device))
        else:
            groups = K // group_size  # type: ignore[operator]
            self.register_buffer("weight", torch.empty(V, K // 2, dtype=torch.uint8, device=device))
            self.register_buffer("scales", torch.empty(V, groups, dtype=torch.float32, device=device))
            self.register_buffer("zeros", torch.empty(V, groups, dtype=torch.float32, device=device))
        self.rows: nn.Module | None = None

    @classmethod
    def tied_to(cls, head: QuantizedLinear, dtype: torch.dtype) -> QuantizedEmbedding:
        """An embedding sharing ``head``'s portable tensors (call before the head is packed)."""
        bits = 8 if isinstance(head, Int8Linear) else 4
        with torch.device("meta"):
            module = cls(head.out_features, head.in_features, bits, getattr(head, "group_size", None), dtype)
        for name in list(module._buffers):
            setattr(module, name, getattr(head, name))
        return module

    def read_rows_from_kernel(self, head: QuantizedLinear) -> bool:
        """Once ``head`` (the tied head over these tensors) is packed for the vnni kernel, gather rows from
        its packed matrix and drop the portable copy; returns whether it did."""
        if self.rows is not None or head.kernel_in_use not in PROJECT_KERNELS or self.weight is None:
            return False
        packed = head.vnni_matrix()[0]
        self.rows = PackedRows(packed, self.num_embeddings, self.embedding_dim, self.bits)
        self.weight = None
        return True

    def share_with(self, head: QuantizedLinear) -> None:
        """Give ``head`` this embedding's tensors (the same objects: stored once, held once)."""
        for name in list(self._buffers):
            setattr(head, name, getattr(self, name))

    @property
    def row_bytes(self) -> int:
        """Bytes one lookup reads per token: the quantized row and its scales (and zeros)."""
        if self.bits == 8:
            return self.embedding_dim + self.scales[0].numel() * self.scales.element_size()
        groups = self.embedding_dim // self.group_size  # type: ignore[operator]
        return self.embedding_dim // 2 + 2 * groups * self.scales.element_size()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        q = self.rows(ids) if self.rows is not None else self.weight[ids]
        if self.bits == 8:
            scales = self.scales[ids].reshape(*ids.shape, -1, 1)  # [..., groups, 1], one group per channel
            q = q.float().reshape(*ids.shape, scales.shape[-2], -1)
            return (q * scales).reshape(*ids.shape, self.embedding_dim).to(self.dtype)
        q = torch.stack([q & 0x0F, q >> 4], dim=-1).reshape(*ids.shape, -1, self.group_size).float()
        w = (q - 8) * self.scales[ids][..., None] + self.zeros[ids][..., None]
        return w.reshape(*ids.shape, self.embedding_dim).to(self.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        if self.rows is not None:
            raise MobiLlamaError(
                "this model reads its embedding rows from the packed LM head or the checkpoint file (loaded "
                "for inference); "
                "load it with mobillama.infer.quant_checkpoint.load_quantized(pack=False) to save it"
            )
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        source = {None: "", PackedRows: ", rows from the packed head"}.get(
            type(self.rows), ", rows from file"
        )
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}{group}{source}"


def embedding_dtype(model: nn.Module) -> torch.dtype:
    """The float dtype the input embedding returns (a quantized one dequantizes to its ``dtype``)."""
    embed = model.model.embed_tokens
    return embed.dtype if isinstance(embed, QuantizedEmbedding) else embed.weight.dtype


def embedding_row_bytes(model: nn.Module) -> int:
    """Bytes one token's embedding lookup reads."""
    embed = model.model.embed_tokens
    if isinstance(embed, QuantizedEmbedding):
        return embed.row_bytes
    return embed.weight.shape[1] * embed.weight.element_size()
