"""Every family against transformers' PyTorch model on the same safetensors (issues 21, 29): every site
of every layer (the MLP's normalised input, the heads' outputs before o_proj and the MLP's hidden
activations included, as module inputs and outputs there), padded and packed rows, sliding windows past their length and across packed documents,
Llama 3 RoPE past its original context, Gemma's soft-capping, bfloat16 cosine, refusals by name."""

import dataclasses
import json

import numpy as np
import pytest

from beam_extract.hooks import hook_name
from beam_extract.model.config import UnsupportedConfigError, check_context, rope_frequencies
from beam_extract.model.loaded import load_model
from hf_reference import FAMILIES, SITES, hf_activations, random_hf_checkpoint

HOOKS = tuple((layer, site) for layer in range(3) for site in SITES)


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max()) / max(1.0, float(np.abs(ref).max()))


def packed_forward(model, docs: list[np.ndarray], length: int, hooks: tuple = HOOKS) -> dict:
    """One row holding `docs` back to back (positions restarting, a segment each), padded to `length`."""
    tokens, positions, segments = (np.zeros((1, length), np.int32) for _ in range(3))
    at = 0
    for number, doc in enumerate(docs, 1):
        tokens[0, at:at + len(doc)], positions[0, at:at + len(doc)] = doc, np.arange(len(doc))
        segments[0, at:at + len(doc)] = number
        at += len(doc)
    return model.forward(tokens, positions, segments, hooks)[0]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_float32_parity_every_site_and_layer_padded_and_packed(tmp_path, family):
    """Rows of 13, 7 and 1 tokens in a [3, 13] batch (sliding windows of 5 and 6: shorter than the
    rows), and a packed row of the first two documents, against transformers: <= 1e-4 of max |ref|."""
    hf = random_hf_checkpoint(tmp_path, seed=len(family), family=family)
    model = load_model(str(tmp_path), dtype="float32")
    lengths = np.array([13, 7, 1])
    ids = np.random.default_rng(0).integers(0, hf.config.vocab_size, size=(3, 13))
    ref = hf_activations(hf, ids, lengths)
    ours = model.run_with_cache(ids, list(ref), lengths=lengths)
    packed = packed_forward(model, [ids[0, :6], ids[1, :7]], 13)
    worst = 0.0
    for layer, site in HOOKS:
        hook = hook_name(layer, site)
        for row, length in enumerate(lengths):
            worst = max(worst, relative_error(ours[hook][row, :length], ref[hook][row, :length]))
        worst = max(worst, relative_error(packed[layer, site][0, :6], ref[hook][0, :6]),
                    relative_error(packed[layer, site][0, 6:], ref[hook][1, :7]))
    print(f"{family}: max relative error {worst:.2e}")
    assert worst <= 1e-4, (family, worst)


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_sliding_window_over_tiles_and_packed_documents(tmp_path, family):
    """Windows of 40 keys over 300-token rows (tiles of 128 skipped before the window), and a packed
    row whose second document starts past a tile boundary and outlasts the window."""
    hf = random_hf_checkpoint(tmp_path, seed=2, family=family, sliding_window=40, num_hidden_layers=2)
    model = load_model(str(tmp_path))
    rng = np.random.default_rng(1)
    first, second = rng.integers(0, 512, size=300), rng.integers(0, 512, size=150)
    ref_first, ref_second = hf_activations(hf, first[None]), hf_activations(hf, second[None])
    hooks = tuple((layer, site) for layer in range(2) for site in SITES)
    alone = model.forward(first[None], np.arange(300)[None], np.ones((1, 300)), hooks)[0]
    packed = packed_forward(model, [first[:140], second], 300, hooks)
    for layer, site in hooks:
        hook = hook_name(layer, site)
        assert relative_error(alone[layer, site][0], ref_first[hook][0]) <= 1e-4, hook
        assert relative_error(packed[layer, site][0, :140], ref_first[hook][0, :140]) <= 1e-4, hook
        assert relative_error(packed[layer, site][0, 140:290], ref_second[hook][0]) <= 1e-4, hook


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "linear", "factor": 4.0},
], ids=["llama3", "linear"])
def test_scaled_rope_past_the_original_context(tmp_path, rope):
    hf = random_hf_checkpoint(tmp_path, seed=4, family="llama", num_hidden_layers=2,
                              rope_parameters={"rope_theta": 500000.0, **rope})
    model = load_model(str(tmp_path))
    default = rope_frequencies(dataclasses.replace(model.config, rope_scaling=()))
    scaled = rope_frequencies(model.config)
    assert (scaled != default).any() and (scaled == default).any() == (rope["rope_type"] == "llama3")
    ids = np.random.default_rng(2).integers(0, 512, size=(1, 200))  # positions to 199, past 64
    ref = hf_activations(hf, ids)
    ours = model.run_with_cache(ids, list(ref))
    for hook, value in ref.items():
        assert relative_error(ours[hook], value) <= 1e-4, hook


def test_gemma_soft_capping_is_active(tmp_path):
    """With a cap of 2 the scores go past it: the same model without the cap is far from
    transformers, with it within the parity tolerance."""
    hf = random_hf_checkpoint(tmp_path, seed=6, family="gemma2")
    model = load_model(str(tmp_path))
    uncapped = dataclasses.replace(model, config=dataclasses.replace(model.config, attn_softcap=None), _compiled={})
    ids = np.random.default_rng(3).integers(0, 512, size=(1, 20))
    ref = hf_activations(hf, ids)["blocks.0.hook_attn_out"]
    assert relative_error(model.run_with_cache(ids, ["blocks.0.hook_attn_out"])["blocks.0.hook_attn_out"], ref) <= 1e-4
    assert relative_error(uncapped.run_with_cache(ids, ["blocks.0.hook_attn_out"])["blocks.0.hook_attn_out"],
                          ref) > 1e-2


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_mlp_in_is_transformer_lens_hook_normalized_with_the_norm_weight_applied(tmp_path, family):
    """What the README says of `ln2.hook_normalized`: TransformerLens hooks its norm before the
    weight (x / sqrt(mean x^2 + eps), centred first for LayerNorm); our mlp_in, the MLP's input, is
    that times w (Gemma 1 + w; GPT-2 w, plus b), so the two differ by the weight and nothing else."""
    hf = random_hf_checkpoint(tmp_path, seed=7, family=family)
    model = load_model(str(tmp_path), dtype="float32")
    ids = np.random.default_rng(4).integers(0, hf.config.vocab_size, size=(2, 9))
    ref = hf_activations(hf, ids)
    ours = model.run_with_cache(ids, [hook_name(1, "mlp_in")])[hook_name(1, "mlp_in")]
    block = (hf.base_model.layers if family != "gpt2" else hf.base_model.h)[1]
    norm = {"llama": "post_attention_layernorm", "gemma2": "pre_feedforward_layernorm", "gpt2": "ln_2"}[family]
    module = getattr(block, norm)
    x = ref[hook_name(1, "resid_mid")].astype(np.float64)
    if family == "gpt2":
        x = x - x.mean(-1, keepdims=True)
    eps = getattr(module, "eps", getattr(module, "variance_epsilon", None))
    transformer_lens = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    weight = module.weight.detach().double().numpy()
    if family == "gemma2":
        weight = 1 + weight
    applied = transformer_lens * weight + (module.bias.detach().double().numpy() if family == "gpt2" else 0)
    assert relative_error(ours, applied) <= 1e-4
    assert relative_error(ours, transformer_lens) > 1e-2  # the weight is not folded away


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return float(((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))).min())


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - {"qwen2"}))
def test_bfloat16_compute_cosine_against_float32_reference(tmp_path, family):
    """Per token cosine >= 0.999, or where transformers' own bfloat16 forward is further from its
    float32 one (Gemma 3's norm after attention makes a near-zero attention output unit-sized, and
    with it its rounding: 0.9986 at layer 2 of this config), no worse than transformers'."""
    import copy

    import torch

    hf = random_hf_checkpoint(tmp_path, seed=5, family=family)
    model = load_model(str(tmp_path), dtype="bfloat16")
    ids = np.random.default_rng(2).integers(0, 512, size=(2, 33))
    ref = hf_activations(hf, ids)
    ours = model.run_with_cache(ids, list(ref))
    hf_bf16 = None
    for hook, value in ref.items():
        cosine = min_cosine(ours[hook], value)
        if cosine < 0.999:
            hf_bf16 = hf_bf16 or hf_activations(copy.deepcopy(hf).to(torch.bfloat16), ids)
            assert cosine >= min_cosine(hf_bf16[hook], value), f"{family} {hook}: min per-token cosine {cosine:.5f}"


@pytest.mark.parametrize("family, changes, field", [
    ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "rope_scaling"),
    ("llama", {"hidden_act": "relu"}, "hidden_act"),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 8, "layer_types": None}, "use_sliding_window"),
    ("gemma2", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ("gemma2", {"layer_types": ["sliding_attention", "chunked_attention", "full_attention"]}, "layer_types"),
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ("gpt2", {"activation_function": "relu"}, "activation_function"),
])
def test_unsupported_config_fields_are_named(tmp_path, family, changes, field):
    random_hf_checkpoint(tmp_path, family=family)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **changes}))
    with pytest.raises(UnsupportedConfigError, match=field) as error:
        load_model(str(tmp_path))
    assert error.value.field == field


def test_positions_past_the_model_are_refused(tmp_path):
    random_hf_checkpoint(tmp_path, family="gpt2", n_positions=16)
    model = load_model(str(tmp_path))
    with pytest.raises(ValueError, match="--max_seq_len 17: .*max_position_embeddings=16"):
        check_context(model.config, 17)
    check_context(model.config, 16)
    with pytest.raises(ValueError, match="position 16 has no learned embedding"):
        model.run_with_cache(np.zeros((1, 17), np.int32), ["blocks.0.hook_resid_pre"])


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(set(FAMILIES) - {"qwen2"}))
def test_pipeline_end_to_end_per_family(tmp_path, family):
    """A text job on the DirectRunner's FnApiRunner with a checkpoint of each family (Qwen2.5's
    tokenizer files, so its vocabulary): every record, of the residual and inner sites each at its
    width, equals a direct forward of its sequence."""
    from pathlib import Path

    from beam_extract.model.embedded import write_random_checkpoint
    from beam_extract.options import sample_input
    from beam_extract.pipeline import run
    from beam_extract.readers.reader import read_records

    config_class, _, defaults = FAMILIES[family]
    vocab = {"vocab_size": 151936, "bos_token_id": 151643, "eos_token_id": 151645}
    write_random_checkpoint(tmp_path / "model", config_class(**{**defaults, **vocab}), seed=1)
    lines = (Path(sample_input()).parent / "sample_text.jsonl").read_text().splitlines()[:3]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    run([f"--input={tmp_path / 'docs.jsonl'}", f"--output={tmp_path / 'out'}", f"--model={tmp_path / 'model'}",
         "--max_seq_len=128", "--buckets=128", "--layers=0,2", "--sites=attn_out,resid_post,z,mlp_post",
         "--exclude_special_tokens=false"])
    model = load_model(str(tmp_path / "model"))
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert manifest["model"]["config"]["family"] == family and manifest["counts"]["samples"] > 0
    records = {hook: [r for f in summary["files"] for r in read_records(str(tmp_path / "out" / f))]
               for hook, summary in manifest["hooks"].items()}
    # One direct forward of every sequence at every hook, right-padded: causal, so padding changes
    # nothing before it, and one shape compiles once.
    sequences = {r["sample_id"]: r["sequence_token_ids"] for r in next(iter(records.values()))}
    row_of = {sample_id: row for row, sample_id in enumerate(sequences)}
    rows = np.zeros((len(sequences), 128), np.int32)
    for row, ids in zip(rows, sequences.values()):
        row[:len(ids)] = ids
    direct = model.run_with_cache(rows, list(records))
    for hook, written in records.items():
        assert len(written) == manifest["counts"]["samples"] == len(sequences)
        for record in written:
            assert record["d_model"] == model.config.width(manifest["hooks"][hook]["site"])
            want = direct[hook][row_of[record["sample_id"]]][record["positions"]]
            np.testing.assert_allclose(record["activations"], want, rtol=0, atol=1e-5 * max(1, np.abs(want).max()))
