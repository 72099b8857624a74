"""The Hugging Face shell: ``MobiLlamaConfig`` and ``MobiLlamaForCausalLM`` for the transformers ecosystem.

A thin wrapper, not a second model: ``MobiLlamaForCausalLM`` composes the same :class:`~mobillama.model.Decoder`
and LM head as :class:`~mobillama.model.MobiLlama`, so the state-dict names, the math and the checkpoints are
the same. What it adds is what transformers expects: ``from_pretrained``/``save_pretrained``, ``generate()``
(with HF's ``DynamicCache``, which fits the decoder's cache protocol), ``labels`` → loss, output dataclasses,
and registration with ``AutoConfig``/``AutoModelForCausalLM`` so pipelines, peft and lm-eval find it.

Importing this module imports transformers and registers model_type ``mobillama``; ``import mobillama``
alone does neither (it stays torch-only for inference), but touching ``mobillama.MobiLlamaConfig`` or
``mobillama.MobiLlamaForCausalLM`` imports this module. So before ``AutoModelForCausalLM.from_pretrained``
on a mobillama checkpoint, ``import mobillama.hf``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    DynamicCache,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from mobillama.config import ModelConfig
from mobillama.model import Decoder, causal_lm_loss

_MODEL_FIELDS = [f.name for f in dataclasses.fields(ModelConfig)]


def _model_config_namespace() -> dict[str, Any]:
    """A class body declaring every :class:`ModelConfig` field with its type and default; transformers
    turns the annotated class attributes of a config class into its dataclass fields."""
    fields = dataclasses.fields(ModelConfig)
    defaults = {
        f.name: f.default
        if f.default is not dataclasses.MISSING
        else dataclasses.field(default_factory=f.default_factory)
        for f in fields
    }
    return {"__module__": __name__, "__annotations__": {f.name: f.type for f in fields}, **defaults}


# ModelConfig's fields, derived from the dataclass: a new ModelConfig field needs no edit here.
_ModelConfigFields = type("_ModelConfigFields", (PreTrainedConfig,), _model_config_namespace())


class MobiLlamaConfig(_ModelConfigFields):
    """:class:`~mobillama.config.ModelConfig` as a transformers config (``model_type: mobillama``)."""

    model_type = "mobillama"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    # transformers' conventions beyond ModelConfig: token ids may be None (EOS also a list), a pad id, the cache
    bos_token_id: int | None = ModelConfig.bos_token_id
    eos_token_id: int | list[int] | None = ModelConfig.eos_token_id
    pad_token_id: int | None = None
    use_cache: bool = True

    def to_model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(
            {k: getattr(self, k) for k in _MODEL_FIELDS if getattr(self, k, None) is not None}, strict=False
        )

    @classmethod
    def from_model_config(cls, config: ModelConfig, **kwargs) -> MobiLlamaConfig:
        return cls(**config.to_dict(), **kwargs)


class MobiLlamaForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MobiLlamaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MobiLlamaConfig) -> None:
        super().__init__(config)
        self.model = Decoder(config.to_model_config())
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None) -> None:
        self.model.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.model.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.model.gradient_checkpointing

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values=None,
        segment_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        # transformers 5.x renamed past_key_values to cache; accept either.
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and not self.training:
            cache = DynamicCache(config=self.config)
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("MobiLlamaForCausalLM takes a 2-D attention_mask [batch, length] of 1/0")
        hidden = self.model(input_ids, attention_mask, position_ids, cache, inputs_embeds, segment_ids)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None}
        )


# The output field that carries the cache: "cache" from transformers 5.2x on, "past_key_values" before.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

AutoConfig.register("mobillama", MobiLlamaConfig, exist_ok=True)
AutoModelForCausalLM.register(MobiLlamaConfig, MobiLlamaForCausalLM, exist_ok=True)
