"""One quantized table for a model whose input embedding and output layer are tied.

A tied model has a single [vocab, hidden] table. When a recipe quantizes its output layer, the table
is quantized once and the embedding lookups read the same quantized rows the logits use (as
llama.cpp does with a tied ``token_embd``): the embedding is then part of the quantized model, a
packed model keeps no float copy of the table (on Gemma-3 270M that copy is 60% of an INT4 model),
and the fake-quant model computes exactly what the packed one does.
"""

from __future__ import annotations

import torch
from torch import nn

from .linear import QuantLinear


class TiedEmbedding(nn.Module):
    """Embedding lookups served by a tied, quantized output layer (``head.weight_rows``).

    The head is not a submodule: its codes belong to the output layer and are saved there once.
    Scaled embeddings (Gemma's ``embed_scale``) keep their scale.
    """

    def __init__(self, head: QuantLinear, embedding: nn.Embedding):
        super().__init__()
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.padding_idx = embedding.padding_idx
        self._head = (head,)
        head.keep_codes = True  # lookups decode rows of the codes; the int4 kernel's layout cannot
        scale = getattr(embedding, "embed_scale", None)
        self.register_buffer("embed_scale", None if scale is None else scale.detach().clone(), persistent=False)

    @property
    def head(self) -> QuantLinear:
        return self._head[0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.head.weight_rows(ids)
        return rows if self.embed_scale is None else rows * self.embed_scale.to(rows.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The whole table as the lookups see it (dequantized on each access: for exporters)."""
        return self.head.weight_rows(torch.arange(self.num_embeddings)).detach()

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, tied to the quantized output layer"


def _shareable(embedding: nn.Module) -> bool:
    """Plain lookups (optionally times Gemma's constant scale): nothing else the table would lose."""
    if not isinstance(embedding, nn.Embedding) or embedding.max_norm is not None:
        return False
    return type(embedding) is nn.Embedding or (type(embedding).__name__.endswith("ScaledWordEmbedding")
                                               and hasattr(embedding, "embed_scale"))


def tie_quantized_embedding(model: nn.Module) -> bool:
    """Serve a tied model's embedding from its (fake-quantized, not yet frozen) output layer; True if
    it was done.

    Left as is (float embedding, as the model had it): untied models, an output layer without weight
    quantization, and embedding classes that do more than a (scaled) lookup.
    """
    if not hasattr(model, "get_input_embeddings"):
        return False
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if isinstance(emb, TiedEmbedding):
        return True
    if not (isinstance(head, QuantLinear) and head.weight_spec is not None and not head.frozen
            and head.weight is getattr(emb, "weight", None) and _shareable(emb)):
        return False
    model.set_input_embeddings(TiedEmbedding(head, emb))
    return True
