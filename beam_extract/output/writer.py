"""Activation records -> one TFRecord dataset per hook: OUT/{site}/layer_{LL}/part-SSSSS-of-NNNNN.tfrecord."""

from __future__ import annotations

import apache_beam as beam
from apache_beam.io.tfrecordio import WriteToTFRecord

from beam_extract.model.qwen2 import Hook


def hook_prefix(output: str, hook: Hook) -> str:
    layer, site = hook
    return f"{output}/{site}/layer_{layer:02d}/part"


class WriteActivations(beam.PTransform):
    """Writes each hook's records with Beam's TFRecord sink (temp files, then rename); returns the
    final file names of all hooks."""

    def __init__(self, output: str, hooks: tuple[Hook, ...], num_shards: int):
        super().__init__()
        self._output, self._hooks, self._num_shards = output, hooks, num_shards

    def expand(self, records):
        per_hook = records | "ByHook" >> beam.Partition(lambda record, _: record.hook_index, len(self._hooks))
        written = []
        for index, hook in enumerate(self._hooks):
            name = f"{hook[1]}_{hook[0]:02d}"
            written.append(
                per_hook[index]
                | f"Serialized[{name}]" >> beam.Map(lambda record: record.example)
                | f"Write[{name}]" >> WriteToTFRecord(hook_prefix(self._output, hook), file_name_suffix=".tfrecord",
                                                      num_shards=self._num_shards)
            )
        return written | "AllFiles" >> beam.Flatten()


class WriteDeadLetters(beam.PTransform):
    """Dead letters as JSON lines under OUT/dead_letter/ (an empty file when there are none)."""

    def __init__(self, output: str):
        super().__init__()
        self._output = output

    def expand(self, dead_letters):
        return (
            dead_letters
            | "ToJson" >> beam.Map(lambda letter: letter.to_json())
            | "Write" >> beam.io.WriteToText(f"{self._output}/dead_letter/part", file_name_suffix=".jsonl",
                                             num_shards=1)
        )
