"""Qwen3 dense (Qwen3ForCausalLM): the Llama architecture (llama.py) with each head's query and key RMS-normalized
before RoPE, and head_dim given by the config (128 by default, as transformers' Qwen3Config has it).
"""
from typing import Literal

from runtime.config_schema import Positive, config_args
from runtime.models import llama
from runtime.models.family import Family, hf_component_of


@config_args
class ModelArgs(llama.ModelArgs):
    head_dim: llama.HeadDim | None = 128
    max_position_embeddings: Positive = 32768
    use_sliding_window: Literal[False] = False  # no released Qwen3 uses it; transformers' own default is off

    qk_norm = True


FAMILY = Family(
    name="qwen3",
    model_types=("qwen3",),
    args_class=ModelArgs,
    model_class=llama.Llama,
    component_of=hf_component_of,
    gguf="runtime.models.qwen3_gguf",
    reply_format="qwen3",
    reference_model_type="qwen3",
)
