"""gs:// through a real GCS API server on loopback: model loading and the whole pipeline."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from beam_extract.model.loaded import load_model
from beam_extract.model.weights import resolve_model_dir
from beam_extract.options import sample_input
from conftest import upload_dir
from hf_reference import random_hf_checkpoint
from test_pipeline_default_run import run_guarded


def test_model_loads_from_gs_and_equals_local(tmp_path, gcs_bucket):
    random_hf_checkpoint(tmp_path, seed=21, tie_word_embeddings=False)
    upload_dir(tmp_path, f"{gcs_bucket}/models/gcs-test")
    hooks = ["blocks.0.hook_resid_pre", "blocks.2.hook_resid_post"]
    ids = np.arange(1, 9)[None]
    remote = load_model(f"{gcs_bucket}/models/gcs-test")
    local = load_model(str(tmp_path))
    assert remote.weights_sha256 == local.weights_sha256
    for hook in hooks:
        np.testing.assert_array_equal(remote.run_with_cache(ids, hooks)[hook], local.run_with_cache(ids, hooks)[hook])
    config_only = resolve_model_dir(f"{gcs_bucket}/models/gcs-test", weights=False)
    assert (config_only / "config.json").exists()


@pytest.mark.slow
def test_pipeline_with_input_model_and_output_on_gcs(tmp_path, gcs_bucket):
    from beam_extract.format.layout import read_manifest
    from beam_extract.readers.reader import read_records

    upload_dir(resolve_model_dir("tiny-random-qwen2"), f"{gcs_bucket}/models/tiny")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    shutil.copy(Path(sample_input()).parent / "sample_text.jsonl", inputs / "text-00000.jsonl")
    upload_dir(inputs, f"{gcs_bucket}/inputs")
    output = f"{gcs_bucket}/runs/text"
    log = tmp_path / "connections.log"
    result = run_guarded([f"--input={gcs_bucket}/inputs/*.jsonl", f"--model={gcs_bucket}/models/tiny",
                          f"--output={output}", "--sites=resid_post,mlp_out", "--layers=1",
                          "--output_dtype=bfloat16"], tmp_path, log)
    assert result.returncode == 0, result.stderr[-5000:]
    assert not log.exists(), log.read_text()  # only the loopback emulator was contacted

    manifest = read_manifest(output)
    assert manifest["counts"]["samples"] == 6 and manifest["output_dtype"] == "bfloat16"
    model = load_model("tiny-random-qwen2")
    for hook_name, hook in manifest["hooks"].items():
        assert len(hook["files"]) == 1 and hook["files"][0].startswith(f"{hook['site']}/layer_01/part-")
        records = list(read_records(f"{output}/{hook['files'][0]}"))
        assert len(records) == 6 and {r["hook_name"] for r in records} == {hook_name}
        for record in records:
            direct = model.run_with_cache(record["token_ids"][None], [hook_name])[hook_name][0]
            np.testing.assert_allclose(record["activations"], direct, rtol=2**-7, atol=1e-2)
    assert manifest["dead_letter_files"] == [f"dead_letter/{stage}-00000-of-00001.jsonl"
                                             for stage in ("dedup", "extract", "parse", "read", "resume", "tokenize")]
    assert json.loads(json.dumps(manifest))["model"]["name"] == f"{gcs_bucket}/models/tiny"


def test_a_cached_gs_model_is_fetched_again_when_its_weights_change_at_the_same_size(tmp_path, gcs_bucket):
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems
    from safetensors.numpy import load_file, save_file

    random_hf_checkpoint(tmp_path, seed=22, tie_word_embeddings=True)
    url = f"{gcs_bucket}/models/changing"
    upload_dir(tmp_path, url)
    first = load_model(url).weights_sha256
    tensors = load_file(tmp_path / "model.safetensors")
    name = next(n for n in sorted(tensors) if n.endswith("mlp.up_proj.weight"))
    tensors[name] = tensors[name] * np.float32(-1)
    save_file(tensors, tmp_path / "model.safetensors")
    with FileSystems.create(f"{url}/model.safetensors", compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        handle.write((tmp_path / "model.safetensors").read_bytes())
    assert load_model(url).weights_sha256 == load_model(str(tmp_path)).weights_sha256 != first
