"""Records built without TensorFlow parse with TensorFlow, and both readers give back what was written."""

import json

import ml_dtypes
import numpy as np
import pytest

from beam_extract.format.schema import OUTPUT_DTYPES, decode_record, encode_record, tf_feature_spec
from beam_extract.format.tfrecord import iter_tfrecord, write_record
from beam_extract.readers.reader import read_activations, read_records, tf_dataset, token_batches

RNG = np.random.default_rng(0)


def record_args(n_tokens=5, d_model=8, dtype="float32", sample_id="doc#w0", **overrides):
    return dict(sample_id=sample_id, hook_name="blocks.2.hook_mlp_out", layer=2,
                activations=RNG.standard_normal((n_tokens, d_model)).astype(np.float32) * 30,
                sequence_token_ids=np.arange(97, 100 + n_tokens), positions=np.arange(n_tokens) + 3,
                output_dtype=dtype, source="in.jsonl:4", **overrides)


def write_tfrecord(path, payloads):
    import tensorflow as tf

    with tf.io.TFRecordWriter(str(path)) as writer:
        for payload in payloads:
            writer.write(payload)


@pytest.mark.parametrize("dtype", sorted(OUTPUT_DTYPES))
def test_round_trip_through_tensorflow_and_numpy_readers(tmp_path, dtype):
    args = record_args(dtype=dtype, task_id="task-1", augmentation='{"k": 1}')
    expected = args["activations"].astype(OUTPUT_DTYPES[dtype]).astype(np.float32)
    write_tfrecord(tmp_path / "a.tfrecord", [encode_record(**args)] * 2)
    manifest = {"output_dtype": dtype, "hooks": {"blocks.2.hook_mlp_out": {"files": ["a.tfrecord"]}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))

    numpy_records = list(read_activations(str(tmp_path), "blocks.2.hook_mlp_out"))
    assert [r["sample_id"] for r in read_records(str(tmp_path / "*.tfrecord"))] == ["doc#w0"] * 2
    tf_records = list(tf_dataset(str(tmp_path), "blocks.2.hook_mlp_out").as_numpy_iterator())
    assert len(numpy_records) == len(tf_records) == 2
    for ours, theirs in zip(numpy_records, tf_records):
        np.testing.assert_array_equal(ours["activations"], expected)
        np.testing.assert_array_equal(theirs["activations"], expected)
        np.testing.assert_array_equal(ours["token_ids"], theirs["token_ids"])
        np.testing.assert_array_equal(ours["positions"], np.arange(5) + 3)
        assert ours["sample_id"] == theirs["sample_id"].decode() == "doc#w0"
        assert ours["hook_name"] == "blocks.2.hook_mlp_out" and ours["layer"] == theirs["layer"] == 2
        assert ours["task_id"] == "task-1" and ours["augmentation"] == {"k": 1}
        assert ours["dtype"] == dtype and ours["d_model"] == 8 and ours["n_tokens"] == 5


def test_every_feature_parses_with_the_shipped_spec():
    import tensorflow as tf

    parsed = tf.io.parse_single_example(encode_record(**record_args()), tf_feature_spec())
    assert set(parsed) == set(tf_feature_spec())


def test_bytes_are_wire_identical_to_tensorflow():
    import tensorflow as tf

    args = record_args(n_tokens=2, d_model=2)
    ours = encode_record(**args)
    theirs = tf.train.Example.FromString(ours)
    assert theirs.SerializeToString(deterministic=True) == ours
    assert decode_record(theirs.SerializeToString())["sample_id"] == "doc#w0"


def test_bfloat16_storage_is_little_endian_bfloat16():
    args = record_args(n_tokens=1, d_model=2, dtype="bfloat16")
    args["activations"] = np.array([[1.0, -2.5]], np.float32)
    record = decode_record(encode_record(**args))
    np.testing.assert_array_equal(record["activations"], [[1.0, -2.5]])
    raw = np.array([[1.0, -2.5]], ml_dtypes.bfloat16).tobytes()
    assert raw == bytes([0x80, 0x3F, 0x20, 0xC0])


def test_corrupt_file_is_detected(tmp_path):
    write_tfrecord(tmp_path / "a.tfrecord", [encode_record(**record_args())])
    data = bytearray((tmp_path / "a.tfrecord").read_bytes())
    data[40] ^= 0xFF
    (tmp_path / "a.tfrecord").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        list(iter_tfrecord(str(tmp_path / "a.tfrecord")))
    (tmp_path / "a.tfrecord").write_bytes(bytes(data[:30]))
    with pytest.raises(ValueError, match="truncated|corrupt"):
        list(iter_tfrecord(str(tmp_path / "a.tfrecord")))


def test_our_framing_is_read_by_tensorflow(tmp_path):
    import tensorflow as tf

    payloads = [encode_record(**record_args()), b"", b"x" * 70000]
    with open(tmp_path / "ours.tfrecord", "wb") as handle:
        for payload in payloads:
            write_record(handle, payload)
    assert [r.numpy() for r in tf.data.TFRecordDataset(str(tmp_path / "ours.tfrecord"))] == payloads
    assert list(iter_tfrecord(str(tmp_path / "ours.tfrecord"))) == payloads


def test_token_batches_shuffle_every_token_once(tmp_path):
    payloads, expected = [], []
    for i in range(12):
        args = record_args(n_tokens=5 + i, d_model=3, sample_id=f"s{i}")
        payloads.append(encode_record(**args))
        expected.append(args["activations"])
    for part in range(3):
        write_tfrecord(tmp_path / f"p{part}.tfrecord", payloads[part::3])
    files = [f"p{part}.tfrecord" for part in range(3)]
    (tmp_path / "manifest.json").write_text(json.dumps({"output_dtype": "float32", "hooks": {"h": {"files": files}}}))
    batches = list(token_batches(str(tmp_path), "h", batch_tokens=7, shuffle_buffer=20, seed=1))
    assert all(b.shape == (7, 3) and b.dtype == np.float32 for b in batches)
    everything = np.concatenate(expected)
    assert len(batches) == len(everything) // 7
    got = np.concatenate(batches)
    in_order = np.concatenate([expected[i] for i in sorted(range(12), key=lambda i: (i % 3, i))])[: len(got)]
    assert not np.array_equal(got, in_order)  # shuffled
    rows = {tuple(r) for r in everything}
    assert all(tuple(r) in rows for r in got) and len({tuple(r) for r in got}) == len(got)  # each token at most once
    again = list(token_batches(str(tmp_path), "h", batch_tokens=7, shuffle_buffer=20, seed=1))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))  # seeded


@pytest.mark.parametrize("buffer", [0, 1, 13, 64, 10_000])
def test_token_batches_draw_every_token_exactly_once_whatever_the_buffer(tmp_path, buffer):
    rng = np.random.default_rng(2)
    payloads, rows = [], []
    for i in range(30):
        args = record_args(n_tokens=int(rng.integers(1, 40)), d_model=2, sample_id=f"s{i}")
        args["activations"] = np.stack([np.full(args["activations"].shape[0], i, np.float32),
                                        np.arange(args["activations"].shape[0], dtype=np.float32)], axis=1)
        payloads.append(encode_record(**args))
        rows += [tuple(r) for r in args["activations"]]
    write_tfrecord(tmp_path / "p.tfrecord", payloads)
    manifest = {"output_dtype": "float32", "hooks": {"h": {"files": ["p.tfrecord"]}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    batch = 5
    got = [tuple(r) for b in token_batches(str(tmp_path), "h", batch_tokens=batch, shuffle_buffer=buffer, seed=3)
           for r in b]
    assert len(got) == len(rows) // batch * batch and len(set(got)) == len(got) and set(got) <= set(rows)


def test_records_of_format_2_without_the_sequence_still_read(tmp_path):
    import tensorflow as tf

    example = tf.train.Example.FromString(encode_record(**record_args()))
    del example.features.feature["sequence_token_ids"]  # as the releases before format 3 wrote them
    old = example.SerializeToString(deterministic=True)
    record = decode_record(old)
    assert record["sequence_token_ids"] is None and list(record["token_ids"]) == list(range(100, 105))
    write_tfrecord(tmp_path / "a.tfrecord", [old])
    (tmp_path / "manifest.json").write_text(json.dumps({"hooks": {"h": {"files": ["a.tfrecord"]}}}))
    parsed = next(tf_dataset(str(tmp_path), "h").as_numpy_iterator())
    assert list(parsed["sequence_token_ids"]) == [] and list(parsed["token_ids"]) == list(range(100, 105))


def test_a_record_holds_its_whole_sequence():
    record = decode_record(encode_record(**record_args()))
    np.testing.assert_array_equal(record["sequence_token_ids"], np.arange(97, 105))
    np.testing.assert_array_equal(record["sequence_token_ids"][record["positions"]], record["token_ids"])


def write_paired_output(tmp_path, widths=(3, 5), groups=3, samples=4, shuffle_hook=None):
    """An output of two hooks over the same samples (commit groups named alike in each hook's
    directory); a token's row at every hook holds (sample, position) in its first two columns.
    `shuffle_hook`: that hook's first file gets its records in another order."""
    rng, hooks = np.random.default_rng(4), {"blocks.0.ln2.hook_normalized": [], "blocks.0.hook_mlp_out": []}
    tokens = []
    for group in range(groups):
        per_hook = {hook: [] for hook in hooks}
        for i in range(samples):
            sample = group * samples + i
            n = int(rng.integers(1, 9))
            positions = np.sort(rng.choice(40, n, replace=False))
            tokens += [(sample, p) for p in positions]
            for (hook, payloads), width in zip(per_hook.items(), widths):
                rows = np.zeros((n, width), np.float32)
                rows[:, 0], rows[:, 1], rows[:, 2:] = sample, positions, rng.standard_normal((n, width - 2))
                payloads.append(encode_record(**{**record_args(sample_id=f"s{sample}"), "activations": rows,
                                                 "hook_name": hook, "positions": positions,
                                                 "sequence_token_ids": np.arange(40)}))
        for index, (hook, payloads) in enumerate(per_hook.items()):
            if hook == shuffle_hook and group == 0:
                payloads = payloads[1:] + payloads[:1]
            (tmp_path / f"h{index}").mkdir(exist_ok=True)
            write_tfrecord(tmp_path / f"h{index}/part-g{group}.tfrecord", payloads)
            hooks[hook].append(f"h{index}/part-g{group}.tfrecord")
    manifest = {"output_dtype": "float32", "hooks": {hook: {"files": files} for hook, files in hooks.items()}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return list(hooks), tokens


def test_paired_reading_yields_each_token_at_every_hook_once_per_epoch_aligned(tmp_path):
    import collections

    hooks, tokens = write_paired_output(tmp_path)
    got = list(token_batches(str(tmp_path), hooks=hooks, batch_tokens=3, shuffle_buffer=5, seed=2, epochs=2))
    assert len(got) == 2 * len(tokens) // 3  # a final partial batch is dropped
    assert all(isinstance(b, tuple) and b[0].shape == (3, 3) and b[1].shape == (3, 5) for b in got)
    first, second = (np.concatenate([b[i] for b in got]) for i in range(2))
    np.testing.assert_array_equal(first[:, :2], second[:, :2])  # the same token in both arrays of every row
    drawn = [tuple(map(int, row)) for row in first[:, :2]]
    assert drawn != sorted(drawn) and max(collections.Counter(drawn).values()) == 2  # shuffled; twice in 2 epochs
    one = list(token_batches(str(tmp_path), hooks=hooks, batch_tokens=1, shuffle_buffer=5, seed=3))
    assert sorted(tuple(map(int, b[1][0, :2])) for b in one) == sorted(tokens)  # every token exactly once
    alone = np.concatenate(list(token_batches(str(tmp_path), hooks[1], batch_tokens=1, shuffle_buffer=5)))
    assert {tuple(r) for r in alone} == {tuple(r) for b in one for r in b[1]}  # the rows the hook alone gives


def test_paired_reading_stacks_hooks_of_one_width(tmp_path):
    hooks, _ = write_paired_output(tmp_path, widths=(4, 4))
    got = list(token_batches(str(tmp_path), hooks=hooks, batch_tokens=4, shuffle_buffer=8, stack=True))
    assert got and all(b.shape == (4, 2, 4) and b.dtype == np.float32 for b in got)
    np.testing.assert_array_equal(np.concatenate(got)[:, 0, :2], np.concatenate(got)[:, 1, :2])
    (tmp_path / "other").mkdir()
    hooks, _ = write_paired_output(tmp_path / "other")
    with pytest.raises(ValueError, match="widths \\[3, 5\\] cannot be stacked"):
        token_batches(str(tmp_path / "other"), hooks=hooks, batch_tokens=4, stack=True)
    with pytest.raises(ValueError, match="give either hook or hooks"):
        token_batches(str(tmp_path), hooks[0], hooks=hooks)


def test_paired_reading_checks_alignment_and_refuses_files_of_other_commits(tmp_path):
    from beam_extract.readers.reader import MisalignedHooks

    hooks, _ = write_paired_output(tmp_path, shuffle_hook="blocks.0.hook_mlp_out")
    with pytest.raises(MisalignedHooks, match="record 0 of .*h1/part-g0.tfrecord is not the tokens of record 0"):
        list(token_batches(str(tmp_path), hooks=hooks, batch_tokens=2, seed=0))
    list(token_batches(str(tmp_path), hooks[0], batch_tokens=2))  # each hook alone reads
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["hooks"][hooks[1]]["files"][0] = "h1/part-gOTHER.tfrecord"  # another run's commit
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MisalignedHooks, match="not written by the same commits of one run"):
        token_batches(str(tmp_path), hooks=hooks, batch_tokens=2)
