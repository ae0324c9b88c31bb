"""Files from untrusted sources checked against pydantic schemas, and the one line that says what is wrong.

A model folder or a plan comes from anywhere (a hub repo, a colleague, a hand edit): every file the toolkit reads is
validated against its schema before a value is used, so a wrong type or an impossible size is one error naming the
file and the field (`MODEL/config.json: num_hidden_layers: expected an integer, got '4'`), never a crash later or a
silently wrong model. Unknown keys are always allowed: real files carry many the toolkit does not read.

Here: the mechanism (`validate`, `read_args`, `config_args`), the config.json keys every family shares (`ConfigKeys`,
`RopeScaling`). Each family's args (runtime/models/) declare their own fields and constraints with `config_args`;
the safetensors header, the index and the plan have their schemas next to their readers.
"""
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic import dataclasses as pydantic_dataclasses
from pydantic import with_config
from typing_extensions import TypedDict

from runtime.errors import K2Error

# Strict: JSON gives every value its type, so "4" or true where an integer goes is a broken file, not a 4 or a 1.
# An int is still accepted where a float goes (a rope factor of 40). NaN and Infinity (Python's json reads them) never.
STRICT = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)
ARGS_CONFIG = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

Positive = Annotated[int, Field(gt=0)]
NonNegative = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]

_PHRASES = {
    "int_type": "expected an integer", "float_type": "expected a number", "bool_type": "expected true or false",
    "string_type": "expected a string", "dict_type": "expected an object", "model_type": "expected an object",
    "dataclass_type": "expected an object", "list_type": "expected a list", "finite_number": "expected a finite number",
}
# The same errors worded for JSON a client sent (a tool list, a request): pydantic's messages in JSON's terms where they
# speak Python's; runtime/tools.py and runtime/serve/errors.py add their own.
JSON_PROBLEMS = {"model_type": "should be a JSON object", "dict_type": "should be a JSON object",
                 "list_type": "should be a JSON list", "string_type": "should be a string", "missing": "is missing"}
_BOUNDS = {"greater_than": "must be greater than {gt}", "greater_than_equal": "must be at least {ge}",
           "less_than_equal": "must be at most {le}", "multiple_of": "must be a multiple of {multiple_of}"}


def _where(loc: tuple) -> str:
    """('stages', 0, 'layers', 2, 'device') -> 'stages[0].layers[2].device'"""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


def describe(error: dict, skip: int = 0) -> str:
    """One pydantic error as `field: what was expected, got VALUE`; the first `skip` parts of its location left out
    (the caller names them)."""
    where, kind, ctx = _where(error["loc"][skip:]), error["type"], error.get("ctx") or {}
    prefix = f"{where}: " if where else ""
    if kind == "missing":
        return f"{prefix}missing"
    if kind == "value_error":  # our own checks: their message shows the value, or names the fields it relates
        return f"{prefix}{ctx['error']}"
    if kind in _BOUNDS:
        what = _BOUNDS[kind].format(**ctx)
    elif kind == "literal_error":
        what = f"expected {ctx['expected']}"
    else:
        what = _PHRASES.get(kind) or error["msg"][0].lower() + error["msg"][1:]
    got = repr(error["input"])
    return f"{prefix}{what}, got {got if len(got) <= 60 else got[:57] + '...'}"


def validate(schema, data: Any, source) -> Any:
    """`data` read from `source` (a path, or a description of where it came from) as `schema` (a pydantic model or
    type) says, or K2Error `source: field: what is wrong`."""
    adapter = schema if isinstance(schema, TypeAdapter) else TypeAdapter(schema)
    try:
        return adapter.validate_python(data)
    except ValidationError as e:
        raise K2Error(f"{source}: {describe(e.errors(include_url=False)[0])}") from None


def config_args(cls):
    """Decorator of a family's `ModelArgs`: a dataclass whose fields are config.json keys, checked strictly (int
    where a float goes is fine) with the constraints its annotations and validators state; other keys are ignored."""
    return pydantic_dataclasses.dataclass(cls, config=ARGS_CONFIG)


def rope_type(scaling: dict | None) -> str:
    """The type of a `rope_scaling` / `rope_parameters` dict (`rope_type`, or the older `type`); "default" for none."""
    return (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))


_ROPE_NEEDS = {"default": (), "linear": ("factor",), "yarn": ("factor", "original_max_position_embeddings"),
               "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor")}


def _rope_complete(scaling: dict) -> dict:
    """A rope scaling the models implement (runtime/layers.py ROPE_TYPES), with the keys it needs: a type the
    toolkit would ignore would run the model silently wrong."""
    kind = rope_type(scaling)
    if kind not in _ROPE_NEEDS:
        raise ValueError(f"rope type {kind!r} is not supported (supported: {', '.join(_ROPE_NEEDS)})")
    for key in _ROPE_NEEDS[kind]:
        if key not in scaling:
            raise ValueError(f"{kind} rope scaling needs {key}")
    if kind == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ValueError("llama3 rope scaling needs high_freq_factor above low_freq_factor")
    return scaling


@with_config(STRICT)
class _RopeScalingKeys(TypedDict, total=False):
    """config.json's `rope_scaling` (or transformers 5's `rope_parameters`), as runtime/layers.py reads it."""

    type: str
    rope_type: str
    rope_theta: Annotated[float, Field(gt=1)]
    factor: PositiveFloat
    original_max_position_embeddings: Positive
    beta_fast: PositiveFloat  # a count of rotations: its logarithm is taken
    beta_slow: PositiveFloat
    mscale: float
    mscale_all_dim: float
    attention_factor: float
    truncate: bool
    low_freq_factor: PositiveFloat
    high_freq_factor: PositiveFloat


RopeScaling = Annotated[_RopeScalingKeys, AfterValidator(_rope_complete)]


def _as_list(value):
    return [value] if isinstance(value, int) and not isinstance(value, bool) else value


class WeightScheme(BaseModel):
    """compressed-tensors' description of how a group's weights are quantized."""

    model_config = STRICT
    num_bits: Positive | None = None
    type: str | None = None
    symmetric: bool | None = None
    strategy: str | None = None
    group_size: Positive | None = None


class ConfigGroup(BaseModel):
    model_config = STRICT
    weights: WeightScheme | None = None


class QuantizationConfig(BaseModel):
    """The `quantization_config` keys the loader, `k2 info` and `k2 plan` read (FP8 blocks, compressed-tensors)."""

    model_config = STRICT
    quant_method: str | None = None
    weight_block_size: Annotated[list[Positive], Field(min_length=2, max_length=2)] | None = None
    format: str | None = None
    config_groups: dict[str, ConfigGroup] | None = None
    ignore: list[str] | None = None


class ConfigKeys(BaseModel):
    """The config.json keys read outside the families: what the checkpoint holds and how, and its stop ids."""

    model_config = STRICT
    model_type: str | None = None
    architectures: list[str] | None = None
    torch_dtype: str | None = None
    dtype: str | None = None
    quantization_config: QuantizationConfig | None = None
    rope_parameters: RopeScaling | None = None
    eos_token_id: Annotated[list[NonNegative] | None, BeforeValidator(_as_list)] = None  # an id or a list of ids


class GenerationConfig(BaseModel):
    """The generation_config.json keys k2 reads: the model's recommended sampling and its end-of-sequence ids."""

    model_config = STRICT
    do_sample: bool | None = None
    temperature: Annotated[float, Field(ge=0)] | None = None
    top_k: NonNegative | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: PositiveFloat | None = None
    eos_token_id: Annotated[list[NonNegative] | None, BeforeValidator(_as_list)] = None  # an id or a list of ids


def read_args(args_class, config: dict, source) -> Any:
    """A family's args (a `config_args` class) from a config.json dict read from `source` and already valid as
    `ConfigKeys`, or K2Error naming the file and field. transformers 5 writes `rope_parameters` (theta inside) where
    published configs have `rope_theta` and `rope_scaling`: either is read."""
    values = dict(config)
    rope = config.get("rope_parameters")
    if rope and "rope_scaling" not in config:
        if "rope_theta" in rope:
            values["rope_theta"] = rope["rope_theta"]
        values["rope_scaling"] = rope if rope_type(rope) != "default" else None
    try:
        return args_class(**values)
    except ValidationError as e:
        raise K2Error(f"{source}: {describe(e.errors(include_url=False)[0])}") from None

