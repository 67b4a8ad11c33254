"""Our JAX Qwen2 against transformers' PyTorch Qwen2 on the same safetensors (DESIGN section 6)."""

import numpy as np
import pytest

from beam_extract.hooks import hook_name
from beam_extract.model.loaded import load_model
from hf_reference import SITES, hf_activations, random_hf_checkpoint

CONFIGS = {
    "mha_1to1_tied": dict(num_attention_heads=4, num_key_value_heads=4, rope_theta=10000.0),
    "gqa_2to1_headdim_untied": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                    tie_word_embeddings=False, rope_theta=1000000.0),
    "gqa_7to1": dict(hidden_size=112, num_attention_heads=14, num_key_value_heads=2, head_dim=8,
                     num_hidden_layers=2, rope_theta=1000000.0),
}


def all_hooks(num_layers):
    return [hook_name(layer, site) for layer in range(num_layers) for site in SITES]


def assert_close(ours, ref, name):
    tolerance = 1e-4 * max(1.0, float(np.abs(ref).max()))
    error = float(np.abs(ours - ref).max())
    assert error <= tolerance, f"{name}: max error {error:.3g} > {tolerance:.3g}"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_float32_parity_every_site_and_layer(tmp_path, name):
    hf = random_hf_checkpoint(tmp_path, seed=len(name), **CONFIGS[name])
    model = load_model(str(tmp_path), dtype="float32")
    rng = np.random.default_rng(0)
    # Odd lengths, right-padded batch: row lengths 13, 7 and 1 in a [3, 13] batch.
    lengths = np.array([13, 7, 1])
    ids = rng.integers(0, hf.config.vocab_size, size=(3, 13))
    ref = hf_activations(hf, ids, lengths)
    ours = model.run_with_cache(ids, all_hooks(hf.config.num_hidden_layers), lengths=lengths)
    assert set(ours) == set(ref)
    for hook, value in ref.items():
        assert ours[hook].shape == value.shape
        for row, length in enumerate(lengths):
            assert_close(ours[hook][row, :length], value[row, :length], f"{name} {hook} row {row}")


def test_long_sequence_crosses_query_blocks(tmp_path):
    """1,100 tokens: three query blocks, the last one padded, against transformers."""
    hf = random_hf_checkpoint(tmp_path, seed=3, num_hidden_layers=2)
    model = load_model(str(tmp_path))
    ids = np.random.default_rng(1).integers(0, hf.config.vocab_size, size=(1, 1100))
    ref = hf_activations(hf, ids)
    ours = model.run_with_cache(ids, ["blocks.1.hook_resid_post", "blocks.0.hook_attn_out"])
    for hook, value in ours.items():
        assert_close(value, ref[hook], hook)


def test_bfloat16_compute_cosine_against_float32_reference(tmp_path):
    hf = random_hf_checkpoint(tmp_path, seed=5, **CONFIGS["gqa_2to1_headdim_untied"])
    model = load_model(str(tmp_path), dtype="bfloat16")
    ids = np.random.default_rng(2).integers(0, hf.config.vocab_size, size=(2, 33))
    ref = hf_activations(hf, ids)
    ours = model.run_with_cache(ids, all_hooks(hf.config.num_hidden_layers))
    for hook, value in ref.items():
        a, b = ours[hook].reshape(-1, value.shape[-1]), value.reshape(-1, value.shape[-1])
        cosine = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
        assert cosine.min() >= 0.999, f"{hook}: min per-token cosine {cosine.min():.5f}"


def test_padded_row_equals_row_alone(tmp_path):
    random_hf_checkpoint(tmp_path, seed=7)
    model = load_model(str(tmp_path))
    ids = np.random.default_rng(3).integers(0, 512, size=(2, 20))
    hooks = all_hooks(3)
    batch = model.run_with_cache(ids, hooks, lengths=[20, 9])
    alone = model.run_with_cache(ids[1:, :9], hooks)
    for hook in hooks:
        np.testing.assert_allclose(batch[hook][1, :9], alone[hook][0], rtol=0, atol=1e-5)


def test_only_requested_depth_is_computed(tmp_path):
    """Asking for layer 0 only gives the same values as asking for everything."""
    random_hf_checkpoint(tmp_path, seed=9)
    model = load_model(str(tmp_path))
    ids = np.arange(10)[None]
    shallow = model.run_with_cache(ids, ["blocks.0.hook_mlp_out"])
    deep = model.run_with_cache(ids, all_hooks(3))
    np.testing.assert_allclose(shallow["blocks.0.hook_mlp_out"], deep["blocks.0.hook_mlp_out"], rtol=0, atol=1e-5)
