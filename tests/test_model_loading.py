"""Checkpoint loading: formats, shards, stored dtypes, and the errors a user must be able to act on."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from beam_extract.model.weights import CheckpointError
from beam_extract.model.config import UnsupportedConfigError
from beam_extract.model.loaded import load_model
from hf_reference import random_hf_checkpoint

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_attn_out", "blocks.2.hook_mlp_out"]
IDS = np.arange(1, 12)[None]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt")
    random_hf_checkpoint(directory, seed=11, tie_word_embeddings=False)
    return directory


def copy_checkpoint(source, target, tensors=None, config_changes=None):
    target.mkdir(exist_ok=True)
    config = json.loads((source / "config.json").read_text())
    config.update(config_changes or {})
    (target / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(source / "model.safetensors")) if tensors is None else tensors
    save_file(tensors, str(target / "model.safetensors"))
    return target


def test_sharded_equals_single_file(checkpoint, tmp_path):
    tensors = load_file(str(checkpoint / "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(tmp_path / file))
    index = {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    single, sharded = load_model(str(checkpoint)), load_model(str(tmp_path))
    assert single.weights_sha256 == sharded.weights_sha256
    single_acts, sharded_acts = single.run_with_cache(IDS, HOOKS), sharded.run_with_cache(IDS, HOOKS)
    for hook in HOOKS:
        np.testing.assert_array_equal(single_acts[hook], sharded_acts[hook])


@pytest.mark.parametrize("stored", ["bfloat16", "float16"])
def test_half_precision_checkpoints_load(checkpoint, tmp_path, stored):
    import ml_dtypes

    dtype = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[stored]
    tensors = {n: t.astype(dtype) for n, t in load_file(str(checkpoint / "model.safetensors")).items()}
    copy_checkpoint(checkpoint, tmp_path, tensors)
    model = load_model(str(tmp_path))
    assert model.params["layers"]["q_w"].dtype == np.float32
    reference = {n: t.astype(np.float32) for n, t in tensors.items()}
    np.testing.assert_array_equal(np.asarray(model.params["embed"]), reference["model.embed_tokens.weight"])


def test_missing_tensor_is_named(checkpoint, tmp_path):
    tensors = load_file(str(checkpoint / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"missing tensor 'layers\.1\.mlp\.up_proj\.weight'"):
        load_model(str(copy_checkpoint(checkpoint, tmp_path, tensors)))


def test_renamed_tensor_is_named(checkpoint, tmp_path):
    tensors = load_file(str(checkpoint / "model.safetensors"))
    tensors["model.layers.0.mlp.upp_proj.weight"] = tensors.pop("model.layers.0.mlp.up_proj.weight")
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.mlp\.upp_proj\.weight'"):
        load_model(str(copy_checkpoint(checkpoint, tmp_path, tensors)))


def test_truncated_tensor_is_named(checkpoint, tmp_path):
    tensors = load_file(str(checkpoint / "model.safetensors"))
    tensors["model.layers.2.self_attn.k_proj.weight"] = tensors["model.layers.2.self_attn.k_proj.weight"][:-1]
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.2\.self_attn\.k_proj\.weight' has shape"):
        load_model(str(copy_checkpoint(checkpoint, tmp_path, tensors)))


def test_truncated_file_is_an_error(checkpoint, tmp_path):
    copy_checkpoint(checkpoint, tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(str(tmp_path))


def test_shard_index_pointing_at_missing_tensor(checkpoint, tmp_path):
    copy_checkpoint(checkpoint, tmp_path)
    names = list(load_file(str(checkpoint / "model.safetensors"))) + ["model.layers.0.extra.weight"]
    index = {"weight_map": {n: "model.safetensors" for n in names}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.extra\.weight"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("changes, field", [
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}, "rope_parameters": None}, "rope_scaling"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
      "rope_parameters": None}, "rope_scaling"),
    ({"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0, "layer_types": None},
     "use_sliding_window"),
    ({"hidden_act": "relu"}, "hidden_act"),
    ({"model_type": "phi3", "architectures": ["Phi3ForCausalLM"]}, "model_type"),
    ({"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"]}, "model_type"),
])
def test_unsupported_config_names_the_field(checkpoint, tmp_path, changes, field):
    with pytest.raises(UnsupportedConfigError, match=field) as error:
        load_model(str(copy_checkpoint(checkpoint, tmp_path, config_changes=changes)))
    assert error.value.field == field


def test_old_style_rope_theta_is_read(checkpoint, tmp_path):
    """Configs written before transformers 5 keep rope_theta at the top level."""
    changes = {"rope_theta": 12345.0, "rope_parameters": None}
    model = load_model(str(copy_checkpoint(checkpoint, tmp_path, config_changes=changes)))
    assert model.config.rope_theta == 12345.0


def test_bad_hook_names(checkpoint):
    model = load_model(str(checkpoint))
    with pytest.raises(ValueError, match="unknown site"):
        model.run_with_cache(IDS, ["blocks.0.hook_resid_max"])
    with pytest.raises(ValueError, match="layer 3 does not exist"):
        model.run_with_cache(IDS, ["blocks.3.hook_resid_post"])


def test_weights_checksum_identifies_the_weights_not_the_files(checkpoint, tmp_path):
    """A re-saved copy (other file metadata) has the same checksum; one changed value changes it."""
    tensors = load_file(str(checkpoint / "model.safetensors"))
    same = load_model(str(copy_checkpoint(checkpoint, tmp_path / "a", tensors)))
    assert (tmp_path / "a/model.safetensors").read_bytes() != (checkpoint / "model.safetensors").read_bytes()
    tensors["model.norm.weight"][3] += 1
    other = load_model(str(copy_checkpoint(checkpoint, tmp_path / "b", tensors)))
    assert load_model(str(checkpoint)).weights_sha256 == same.weights_sha256 != other.weights_sha256


def test_the_readmes_model_import_works():
    from beam_extract.model import load_model
    from beam_extract.model.loaded import load_model as defined

    assert load_model is defined


def test_the_host_copy_of_the_weights_is_let_go_once_placed(checkpoint, monkeypatch):
    """device_put holds a numpy input it copied until XLA's next garbage pass; without one the host
    copy of the weights outlived the load (until a compile ran one) and raised the first batch's
    peak RSS. A host array may stay only as the placed weights' own memory (a zero-copy placement)."""
    import gc
    import weakref

    import jax

    from beam_extract.model import loaded

    host_copies = []

    def remembered(*args):
        params = load_params(*args)
        host_copies.extend(weakref.ref(leaf) for leaf in jax.tree_util.tree_leaves(params))
        return params

    load_params = loaded.load_params
    monkeypatch.setattr(loaded, "load_params", remembered)
    gc.disable()  # no collection but the loader's own
    try:
        model = load_model(str(checkpoint))
        alive = [copy() for copy in host_copies if copy() is not None]
    finally:
        gc.enable()
    placed = {shard.data.unsafe_buffer_pointer()
              for leaf in jax.tree_util.tree_leaves(model.params) for shard in leaf.addressable_shards}
    assert len(host_copies) > 10
    assert [array.shape for array in alive if array.ctypes.data not in placed] == []
