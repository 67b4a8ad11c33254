"""Reading the output without the pipeline's dependencies: the reader imports no framework and reads
gs:// through google-cloud-storage, and the README's snippets for readers without our package (the
tfrecord package, tf.data, numpy for bfloat16) read a pipeline run's output as our reader does."""

import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from beam_extract.format.schema import FEATURES, OUTPUT_DTYPES
from beam_extract.readers.reader import read_activations
from test_pipeline_default_run import run_guarded

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("jax", "transformers", "torch", "tensorflow", "apache_beam")
HOOK = "blocks.1.hook_resid_post"


def fresh_python(code: str, cwd: Path = ROOT):
    """Runs `code` in a new interpreter; returns the JSON it prints last."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=cwd,
                            env=os.environ)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize("module", ["beam_extract.readers.reader", "beam_extract.hooks", "beam_extract.records",
                                    "beam_extract.readers.mixing", "beam_extract.integrations.shards",
                                    "beam_extract.model"])
def test_importing_the_readers_side_loads_no_framework(module):
    loaded = fresh_python(f"import json, sys, {module}\n"
                          f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    assert loaded == []


def put(root: str, name: str, data: bytes) -> None:
    if root.startswith("gs://"):
        from google.cloud import storage

        bucket, _, prefix = root.removeprefix("gs://").partition("/")
        storage.Client().bucket(bucket).blob(f"{prefix}/{name}").upload_from_string(data)
    else:
        Path(root, name).parent.mkdir(parents=True, exist_ok=True)
        Path(root, name).write_bytes(data)


@pytest.mark.parametrize("where", ["local", "gs"])
def test_storage_matches_as_beam_does_and_reads(tmp_path, where, request):
    from apache_beam.io.filesystems import FileSystems

    from beam_extract.format import storage

    root = f"{request.getfixturevalue('gcs_bucket')}/storage-{where}" if where == "gs" else str(tmp_path)
    value = {"a": [1, 2]}
    for name in ("a.json", ".a.json.0123.tmp", "sub/b.json", "sub/deeper/c.json", "ab.jsonl"):
        put(root, name, json.dumps(value).encode())
    put(root, "ids.json.gz", gzip.compress(json.dumps(value).encode()))
    for pattern in ("*.json", ".*.tmp", "*", "sub/*.json", "**.json", "a?json", "[ab]*.json*", "a.json", "none*"):
        beams = sorted(m.path for m in FileSystems.match([f"{root}/{pattern}"])[0].metadata_list)
        assert storage.list_paths(f"{root}/{pattern}") == beams, pattern
    assert storage.list_paths(f"{root}/*.json") == [f"{root}/a.json"]
    assert storage.exists(f"{root}/a.json") and not storage.exists(f"{root}/sub") and not storage.exists(f"{root}/x")
    assert storage.read_json(f"{root}/sub/b.json") == storage.read_json(f"{root}/ids.json.gz") == value
    with storage.open_read(f"{root}/ids.json.gz") as handle:  # as stored: a stream of records is never decompressed
        assert gzip.decompress(handle.read()) == json.dumps(value).encode()


@pytest.fixture(scope="module")
def run_output(tmp_path_factory) -> Path:
    """A bfloat16 run of the packaged samples, at OUT = {workdir}/activations."""
    workdir = tmp_path_factory.mktemp("reading")
    result = run_guarded(["--runner=DirectRunner", "--layers=0,1", "--output_dtype=bfloat16"], workdir,
                         workdir / "connections.log")
    assert result.returncode == 0, result.stderr[-5000:]
    return workdir


def readme_snippets() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Without beam-extract"):]
    section = section[:section.index("\n## ")]
    return re.findall(r"```python\n(.*?)```", section, re.S)


SUMMARY = """
def summary(records) -> dict:
    import hashlib
    return {r["sample_id"]: {"activations": hashlib.sha256(r["activations"].tobytes()).hexdigest(),
                             **{k: r[k].tolist() for k in ("token_ids", "positions", "sequence_token_ids")},
                             **{k: r[k] for k in ("dtype", "hook_name", "source")}} for r in records}
"""
exec(SUMMARY)


@pytest.mark.slow
def test_readme_snippets_read_a_run_as_our_reader_does(run_output, monkeypatch):
    numpy_snippet, tfrecord_snippet, tf_snippet = readme_snippets()
    local = run_output / "activations"
    ours = list(read_activations(str(local), HOOK))
    assert ours and {r["dtype"] for r in ours} == {"bfloat16"}
    expected = summary(ours)

    namespace = {}
    exec(numpy_snippet, namespace)
    rng = np.random.default_rng(0)
    for dtype in OUTPUT_DTYPES:
        values = rng.standard_normal((3, 8), np.float32).astype(OUTPUT_DTYPES[dtype])
        np.testing.assert_array_equal(namespace["to_float32"](values.tobytes(), dtype, 8), values.astype(np.float32))

    # The tfrecord package registers tf.train.Example's messages under TensorFlow's names: it cannot
    # share a process with TensorFlow. The snippets read ./activations, the pipeline's default output.
    kinds = {"bytes": "byte", "int64": "int"}
    got = fresh_python(numpy_snippet + tfrecord_snippet + SUMMARY + "print(json.dumps({'description': DESCRIPTION, "
                       f"'records': summary(read_hook('activations', {HOOK!r}))}}))", cwd=run_output)
    assert got["description"] == {name: kinds[kind] for name, (kind, _, _) in FEATURES.items()}
    assert got["records"] == expected

    monkeypatch.chdir(run_output)
    exec(tf_snippet, namespace)
    parsed = [{k: v.decode() if isinstance(v, bytes) else v for k, v in r.items()}
              for r in namespace["dataset"].as_numpy_iterator()]
    tokens = sum(len(b) for b in namespace["tokens"].as_numpy_iterator())
    assert set(namespace["FEATURES"]) == set(FEATURES)
    assert summary(parsed) == expected
    assert tokens == sum(r["n_tokens"] for r in ours)


READ_BACK = """
import hashlib, json, sys
from beam_extract.readers.reader import read_activations, token_batches
output, hook = {output!r}, {hook!r}
records = {{r["sample_id"]: hashlib.sha256(r["activations"].tobytes()).hexdigest() for r in read_activations(output, hook)}}
tokens = sum(len(b) for b in token_batches(output, hook, batch_tokens=16, shuffle_buffer=64, seed=1))
print(json.dumps({{"records": records, "batched": tokens, "heavy": [m for m in {heavy!r} if m in sys.modules]}}))
"""


@pytest.mark.slow
def test_a_gs_run_reads_without_beam_through_its_manifest_or_commits(run_output, gcs_bucket):
    from google.cloud import storage

    output = f"{gcs_bucket}/reading/run"
    local = run_output / "activations"
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        put(output, path.relative_to(local).as_posix(), path.read_bytes())
    ours = {r["sample_id"]: r["activations"] for r in read_activations(str(local), HOOK)}
    tokens = sum(len(a) for a in ours.values())
    expected = {"records": {s: hashlib.sha256(a.tobytes()).hexdigest() for s, a in ours.items()},
                "batched": tokens - tokens % 16, "heavy": []}
    code = READ_BACK.format(output=output, hook=HOOK, heavy=HEAVY)
    assert fresh_python(code) == expected
    # A run still going (or killed) has no manifest: the reader follows the commits.
    bucket, _, prefix = output.removeprefix("gs://").partition("/")
    storage.Client().bucket(bucket).blob(f"{prefix}/manifest.json").delete()
    assert fresh_python(code) == expected
