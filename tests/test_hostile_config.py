"""config.json from untrusted sources: every real config reads as transformers reads it; a value of the wrong type or
an impossible size is one error line naming the file and the field, never a crash or a silently wrong model."""
import json

import pytest
from transformers import DeepseekV3Config

from runtime import models
from runtime.errors import K2Error
from tests.helpers import assert_one_line_error, copy_checkpoint, edit_json, run_k2_here
from tests.k2_configs import KIMI_K2_CONFIG, KIMI_K2_THINKING_CONFIG


def fresh(config: dict) -> dict:
    """A deep copy as JSON would give it (transformers edits the nested dicts it is given)."""
    return json.loads(json.dumps(config))


REAL_CONFIGS = {
    "Kimi-K2-Instruct": lambda: fresh(KIMI_K2_CONFIG),
    "Kimi-K2-Thinking": lambda: fresh(KIMI_K2_THINKING_CONFIG),
    # What transformers 5 writes (save_pretrained): rope_parameters instead of rope_scaling, dtype, nulls.
    "transformers DeepseekV3Config()": lambda: fresh(DeepseekV3Config().to_dict()),
    "transformers of Kimi-K2-Instruct": lambda: fresh(DeepseekV3Config(**fresh(KIMI_K2_CONFIG)).to_dict()),
    "transformers of Kimi-K2-Thinking": lambda: fresh(DeepseekV3Config(**fresh(KIMI_K2_THINKING_CONFIG)).to_dict()),
}
SAME_IN_TRANSFORMERS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                        "num_attention_heads", "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                        "v_head_dim", "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "n_group",
                        "topk_group", "first_k_dense_replace", "routed_scaling_factor", "norm_topk_prob",
                        "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings")


@pytest.mark.parametrize("name", REAL_CONFIGS)
def test_real_configs_read_as_transformers_reads_them(name):
    args = models.read_args(REAL_CONFIGS[name](), f"{name}/config.json")
    reference = DeepseekV3Config(**REAL_CONFIGS[name]())
    assert {key: getattr(args, key) for key in SAME_IN_TRANSFORMERS} == \
        {key: getattr(reference, key) for key in SAME_IN_TRANSFORMERS}
    rope = reference.rope_parameters
    assert args.rope_theta == rope["rope_theta"]
    if rope["rope_type"] == "yarn":
        assert {k: args.rope_scaling[k] for k in ("factor", "original_max_position_embeddings", "beta_fast")} == \
            {k: rope[k] for k in ("factor", "original_max_position_embeddings", "beta_fast")}
    else:
        assert args.rope_scaling is None


def test_an_integer_goes_where_a_number_does():
    args = models.read_args(fresh(KIMI_K2_CONFIG) | {"routed_scaling_factor": 2, "rope_theta": 50000})
    assert (args.routed_scaling_factor, args.rope_theta) == (2.0, 50000.0)


BAD_VALUES = [
    ({"num_hidden_layers": "4"}, "num_hidden_layers: expected an integer, got '4'"),
    ({"hidden_size": True}, "hidden_size: expected an integer, got True"),
    ({"num_attention_heads": 0}, "num_attention_heads: must be greater than 0, got 0"),
    ({"moe_intermediate_size": -2048}, "moe_intermediate_size: must be greater than 0, got -2048"),
    ({"qk_rope_head_dim": 63}, "qk_rope_head_dim: must be a multiple of 2, got 63"),
    ({"rms_norm_eps": "1e-6"}, "rms_norm_eps: expected a number, got '1e-6'"),
    ({"norm_topk_prob": 1}, "norm_topk_prob: expected true or false, got 1"),
    ({"rope_scaling": "yarn"}, "rope_scaling: expected an object, got 'yarn'"),
    ({"rope_scaling": {"type": "yarn", "original_max_position_embeddings": 4096}},
     "rope_scaling: yarn rope scaling needs factor"),
    # A rope type the models do not implement would run them silently wrong.
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling: rope type 'dynamic' is not supported"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}},
     "rope_scaling: llama3 rope scaling needs low_freq_factor"),
    ({"rope_scaling": {"type": "yarn", "factor": "32", "original_max_position_embeddings": 4096}},
     "rope_scaling.factor: expected a number, got '32'"),
    ({"rope_parameters": ["yarn"]}, "rope_parameters: expected an object"),
    ({"scoring_func": "softmax"}, "scoring_func: expected 'sigmoid', got 'softmax'"),
    ({"num_experts_per_tok": 385}, "num_experts_per_tok (385) exceeds the 384 experts"),
    ({"quantization_config": "fp8"}, "quantization_config: expected an object, got 'fp8'"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 0]}},
     "quantization_config.weight_block_size[1]: must be greater than 0"),
    ({"torch_dtype": ["bfloat16"]}, "torch_dtype: expected a string"),
    ({"eos_token_id": [[163585]]}, "eos_token_id[0]: expected an integer"),
]


@pytest.mark.parametrize("change, message", BAD_VALUES, ids=[message.split(":")[0] for _, message in BAD_VALUES])
def test_a_bad_value_names_the_file_and_field(change, message):
    with pytest.raises(K2Error) as error:
        models.read_args(fresh(KIMI_K2_CONFIG) | change, "MODEL/config.json")
    assert str(error.value).startswith(f"MODEL/config.json: {message}"), str(error.value)


def test_not_an_object():
    with pytest.raises(K2Error, match=r"^MODEL/config.json: expected an object, got \[1, 2\]$"):
        models.read_args([1, 2], "MODEL/config.json")


def test_the_cli_refuses_a_bad_config_in_one_line(demo_dir, tmp_path):
    folder = copy_checkpoint(demo_dir, tmp_path / "m")
    edit_json(folder / "config.json", num_hidden_layers="4")
    assert_one_line_error(run_k2_here("info", folder),
                          f"{folder / 'config.json'}: num_hidden_layers: expected an integer, got '4'")
    edit_json(folder / "config.json", num_hidden_layers=4, rope_scaling=["yarn"])
    assert_one_line_error(run_k2_here("generate", folder, "--ids", "1,2", "-n", "2"),
                          f"{folder / 'config.json'}: rope_scaling: expected an object")
