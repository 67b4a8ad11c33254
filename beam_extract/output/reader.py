"""Reading activation records back: a numpy iterator (no TensorFlow) and a tf.data pipeline."""

from __future__ import annotations

from collections.abc import Iterator

from apache_beam.io.filesystems import FileSystems

from beam_extract.output.schema import OUTPUT_DTYPES, decode_record, tf_feature_spec
from beam_extract.output.tfrecord import iter_tfrecord


def match_files(pattern: str) -> list[str]:
    return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)


def read_records(pattern: str) -> Iterator[dict]:
    """Every record of every file matching `pattern`, decoded (activations as float32 numpy)."""
    for path in match_files(pattern):
        for data in iter_tfrecord(path):
            yield decode_record(data)


def tf_dataset(pattern: str, dtype: str = "float32"):
    """A tf.data.Dataset of parsed records; `activations` decoded to float32 [n_tokens, d_model].

    `dtype` is the stored dtype (manifest.json's `output_dtype`).
    """
    import tensorflow as tf

    spec = tf_feature_spec()
    stored = tf.dtypes.as_dtype(OUTPUT_DTYPES[dtype].name)

    def parse(serialized):
        record = tf.io.parse_single_example(serialized, spec)
        record = {k: tf.sparse.to_dense(v) if isinstance(v, tf.sparse.SparseTensor) else v for k, v in record.items()}
        values = tf.io.decode_raw(record["activations"], stored, little_endian=True)
        record["activations"] = tf.cast(tf.reshape(values, [record["n_tokens"], record["d_model"]]), tf.float32)
        return record

    return tf.data.TFRecordDataset(match_files(pattern)).map(parse)
