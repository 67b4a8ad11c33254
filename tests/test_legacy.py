"""The old scripts' flags and dataset layout keep working."""

import json
import logging
import shutil
from pathlib import Path

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from beam_extract import legacy
from beam_extract.options import extract_options, sample_input


@pytest.fixture(autouse=True)
def fresh_notices():
    legacy._NOTICES.clear()


@pytest.mark.parametrize("old, value, new, expected", [
    ("model_path", "/models/q", "model", "/models/q"),
    ("dataset_path", "tasks.jsonl", "input", "tasks.jsonl"),
    ("layers_to_extract", "0,5", "layers", "0,5"),
    ("activation_type", "residual", "sites", "resid_post"),
    ("activation_type", "mlp", "sites", "mlp_out"),
    ("activation_type", "attn", "sites", "attn_out"),
    ("max_seq_length", "2048", "max_seq_len", 2048),
    ("predictions_per_task", "3", "views_per_task", 3),
    ("prompt_version", "output-from-examples-v0", "prompt_template", "output-from-examples-v0"),
    ("random_seed", "7", "seed", 7),
    ("output_dir", "/tmp/out", "output", "/tmp/out"),
])
def test_renamed_flags_set_the_new_option_and_say_so(caplog, old, value, new, expected):
    with caplog.at_level(logging.WARNING, logger="beam_extract"):
        options = extract_options(PipelineOptions([f"--{old}", value]))
    assert getattr(options, new) == expected
    assert f"--{old} is deprecated: it now sets --{new}=" in caplog.text


@pytest.mark.parametrize("old", sorted(legacy.RETIRED))
def test_retired_flags_are_accepted_with_a_notice(caplog, old):
    with caplog.at_level(logging.WARNING, logger="beam_extract"):
        options = extract_options(PipelineOptions([f"--{old}", "4", "--batch_size", "3"]))
    assert options.batch_size == 3
    assert f"--{old} no longer applies and is ignored: {legacy.RETIRED[old]}" in caplog.text


def test_gcs_flags_become_the_output(caplog):
    options = PipelineOptions(["--gcs_bucket", "bucket", "--gcs_prefix", "runs/a", "--upload_to_gcs"])
    with caplog.at_level(logging.WARNING, logger="beam_extract"):
        ours = legacy.legacy_rewrites(options, extract_options(options))
    assert ours.output == "gs://bucket/runs/a" and "use --output=gs://bucket/runs/a" in caplog.text


def test_bad_activation_type_is_an_error():
    with pytest.raises(SystemExit):
        extract_options(PipelineOptions(["--activation_type", "logits"]))


def old_layout(directory: Path) -> Path:
    """The predecessor's sharded dataset: master_metadata.json and shard_NNN/chunk_*.jsonl."""
    lines = Path(sample_input()).parent.joinpath("sample_arc.jsonl").read_text().splitlines()
    for shard, chunk in ((0, lines[:2]), (1, lines[2:])):
        (directory / f"shard_{shard:03d}").mkdir(parents=True)
        (directory / f"shard_{shard:03d}/chunk_000.jsonl").write_text("\n".join(chunk) + "\n")
    (directory / "master_metadata.json").write_text(json.dumps({"total_shards": 2, "total_tasks": len(lines)}))
    return directory


@pytest.mark.slow
def test_the_old_readme_command_writes_what_the_new_one_does(tmp_path):
    from beam_extract.__main__ import main
    from beam_extract.readers.reader import read_activations

    dataset = old_layout(tmp_path / "sharded_dataset")
    main(["--use_sharded_dataset", "--sharded_dataset_dir", str(dataset), "--model_path", "tiny-random-qwen2",
          "--batch_size", "4", "--output_dir", str(tmp_path / "old"), "--layers_to_extract", "1"])
    main([f"--input={dataset}", "--model=tiny-random-qwen2", "--batch_size=4", f"--output={tmp_path / 'new'}",
          "--layers=1"])
    for run in ("old", "new"):
        assert json.loads((tmp_path / run / "manifest.json").read_text())["counts"]["samples"] == 40

    def records(run):
        return {r["sample_id"]: r["activations"].tobytes()
                for r in read_activations(str(tmp_path / run), "blocks.1.hook_resid_post")}

    assert records("old") == records("new") and len(records("old")) == 40
    shutil.rmtree(tmp_path / "old")
