"""A checkpoint's config.json, checked and read into `ModelConfig` through its family.

Apart from config.py because it needs the family table (families.py), which itself builds on
config.py's types and field readers.
"""

from __future__ import annotations

import json
from pathlib import Path

import transformers

from beam_extract.model.config import ACTIVATIONS, ModelConfig, UnsupportedConfigError
from beam_extract.model.families import family_of


def config_from_hf(hf: transformers.PretrainedConfig) -> ModelConfig:
    """Validates a transformers config and keeps what the forward uses; a field the family cannot
    compute is an UnsupportedConfigError naming it."""
    family = family_of(hf.model_type)
    fields = family.read(hf)
    kv_heads = getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
    if hf.num_attention_heads % kv_heads:
        raise UnsupportedConfigError(
            "num_key_value_heads", kv_heads, f"must divide num_attention_heads={hf.num_attention_heads}")
    fields.setdefault("head_dim", getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
    if fields["activation"] not in ACTIVATIONS:
        raise UnsupportedConfigError(family.activation_field, fields["activation"],
                                     f"implemented activations: {', '.join(ACTIVATIONS)}")
    return ModelConfig(
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads,
        num_kv_heads=kv_heads,
        tie_word_embeddings=bool(hf.tie_word_embeddings),
        max_position_embeddings=hf.max_position_embeddings,
        family=family.model_type,
        **fields,
    )


# Sizes config.json may give, checked before any transformers constructor sees them (a constructor
# builds per-layer lists, so `num_hidden_layers: 1e9` would hang it). Far above any model we load.
CONFIG_BOUNDS = {
    "num_hidden_layers": 1024, "num_attention_heads": 1024, "num_key_value_heads": 1024, "head_dim": 4096,
    "hidden_size": 1 << 16, "intermediate_size": 1 << 20, "vocab_size": 1 << 22, "max_position_embeddings": 1 << 24,
}
OPTIONAL_SIZES = ("num_key_value_heads", "head_dim", "max_position_embeddings")
MAX_CONFIG_BYTES = 1 << 20


def check_config_json(path: Path) -> dict:
    """config.json's model type one we compute, its sizes within CONFIG_BOUNDS as whole numbers
    (under the family's own field names); anything else is an error naming the field."""
    if not path.is_file():
        raise UnsupportedConfigError("config.json", str(path), "is missing")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise UnsupportedConfigError("config.json", f"{path.stat().st_size} bytes", f"over {MAX_CONFIG_BYTES} bytes")
    try:
        raw = json.loads(path.read_text("utf-8"))
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
        raise UnsupportedConfigError("config.json", str(path), f"is not valid JSON: {str(error)[:120]}") from None
    if not isinstance(raw, dict):
        raise UnsupportedConfigError("config.json", type(raw).__name__, "must hold a JSON object")
    family = family_of(raw.get("model_type"))
    for size, bound in CONFIG_BOUNDS.items():
        field = family.field_names.get(size, size)
        value = raw.get(field)
        if value is None and (size in OPTIONAL_SIZES or size in family.optional_sizes):
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= bound:
            raise UnsupportedConfigError(field, value, f"must be a whole number from 1 to {bound}")
    return raw


def load_hf_config(model_dir: str | Path) -> transformers.PretrainedConfig:
    """config.json through AutoConfig, once its sizes are checked: no remote code, so only
    transformers' own classes load."""
    check_config_json(Path(model_dir) / "config.json")
    from huggingface_hub.errors import StrictDataclassFieldValidationError

    try:
        return transformers.AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    except StrictDataclassFieldValidationError as error:  # transformers' typed fields: "abc" for a float
        field, _, why = str(error).partition(":")
        field = field.removeprefix("Validation error for field ").strip("'")
        value = json.loads((Path(model_dir) / "config.json").read_text()).get(field)
        raise UnsupportedConfigError(field, value, " ".join(why.split())) from None
