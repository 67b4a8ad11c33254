"""`python -m beam_extract.preview`: the first prompts exactly as the model will see them, and with
--stats what the whole input makes: samples, tokens, dropped train examples and the output's size.

Takes the job's own options (paste the job's command line), loads only the tokenizer and the model's
config (no weights), so prompts and output size can be checked before paying for accelerators.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import statistics
import sys
from collections.abc import Iterator

import numpy as np

from beam_extract.arc.augment import ArcView, augment
from beam_extract.format.schema import OUTPUT_DTYPES, HookFields, hook_fields, record_size, sample_fields
from beam_extract.format.tfrecord import FRAMING_BYTES
from beam_extract.hooks import hook_name
from beam_extract.io.sources import absolute_input, match_paths
from beam_extract.io.tables import columns_for, read_records
from beam_extract.model.hf_config import config_from_hf, load_hf_config
from beam_extract.model.weights import resolve_model_dir
from beam_extract.options import (OPTIONS, JobOptions, UsageError, add_arguments, parse_layers, parse_sites,
                                  sample_input)
from beam_extract.records import DeadLetter, parse_line
from beam_extract.records.arc import ArcTask
from beam_extract.records.identity import input_root
from beam_extract.stages import is_duplicate_task, prompt_and_selection
from beam_extract.tokenize import Sample, load_tokenizer, to_samples


def preview_samples(options: JobOptions, tokenizer, views: range, vocab_size: int) -> Iterator[tuple[int, Sample | DeadLetter]]:
    """(view, result) of what the pipeline's read, parse, dedup, augment and tokenize stages make of
    the input, in input order: each ARC task's `views`, text documents once (as view 0)."""
    # Prompts as a run started now renders them: its chat templates read its creation date.
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    settings, selection = prompt_and_selection(options, tokenizer, now)
    markers_as_text = not options.special_tokens_in_text
    first_of_id: dict[str, ArcTask] = {}
    fields = options.input_format, options.text_field, input_root(options.input), options.id_field, \
        options.tokens_field
    for path in match_paths(options.input):  # sorted, lines in order: the first of an id is the job's
        for line in read_records(path, columns_for(options), options.max_line_bytes, options.max_expansion):
            record = line if isinstance(line, DeadLetter) else parse_line(line, *fields)
            if isinstance(record, ArcTask):
                first = first_of_id.setdefault(record.task_id, record)
                if first is not record:  # a dead letter, as the job's dedup makes it
                    *_, record = is_duplicate_task(record.task_id, [first, record])
            if isinstance(record, DeadLetter):
                yield 0, record
                continue
            for view in views if isinstance(record, ArcTask) else range(1):
                shown = ArcView(*augment(record, options.seed, view)) if isinstance(record, ArcTask) else record
                for result in to_samples(shown, tokenizer, settings, options.max_seq_len, selection,
                                         markers_as_text, vocab_size, options.prepend_bos):
                    yield view, result


@dataclasses.dataclass
class OutputEstimate:
    """The bytes the job would write per hook (TFRecord framing included), summed sample by sample."""

    hooks: dict[str, tuple[int, HookFields]]  # hook name -> (its width, its encoded fields)
    itemsize: int
    output_dtype: str
    bytes_per_hook: dict[str, int] = dataclasses.field(default_factory=dict)
    stored_tokens: int = 0

    def add(self, sample: Sample) -> None:
        positions = np.arange(len(sample.token_ids)) if sample.stored is None else np.asarray(sample.stored)
        if not len(positions):
            return  # nothing stored, no record
        fields = sample_fields(sequence_token_ids=sample.token_ids, positions=positions,
                               output_dtype=self.output_dtype, sample_id=sample.sample_id,
                               source=f"{sample.source}:{sample.line_number}", task_id=sample.task_id,
                               doc_id=sample.doc_id, augmentation=sample.augmentation)
        self.stored_tokens += len(positions)
        for name, (width, hook) in self.hooks.items():
            size = record_size(len(positions) * width * self.itemsize, fields, hook) + FRAMING_BYTES
            self.bytes_per_hook[name] = self.bytes_per_hook.get(name, 0) + size

    def report(self) -> str:
        total = sum(self.bytes_per_hook.values())
        sizes = sorted(self.bytes_per_hook.values()) or [0]
        per_hook = (f"{_size(sizes[0])} per hook" if sizes[0] == sizes[-1]
                    else f"{_size(sizes[0])} to {_size(sizes[-1])} per hook")
        widths = sorted({width for width, _ in self.hooks.values()})
        return (f"output: {self.stored_tokens:,} stored tokens x {len(self.hooks)} hooks of width "
                f"{', '.join(map(str, widths))} in {self.output_dtype}: {per_hook}, {_size(total)} in all "
                f"({total:,} bytes)")


def _size(n: int) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m beam_extract.preview", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=3, help="Prompts to print")
    parser.add_argument("--view", type=int, default=0, help="ARC augmented view to print")
    parser.add_argument("--stats", action="store_true",
                        help="Read the whole input (every view) and print what it makes and the output's size")
    add_arguments(parser)
    args, _ = parser.parse_known_args(argv)  # the job's Beam options may be pasted along
    options = JobOptions(**{option.name: getattr(args, option.name) for option in OPTIONS})
    options = options.replace(input=absolute_input(options.input or sample_input()))
    try:
        config = config_from_hf(load_hf_config(resolve_model_dir(options.model, weights=False)))
        hooks = {hook_name(layer, site): (config.width(site), hook_fields(hook_name(layer, site), layer,
                                                                          config.width(site)))
                 for site in parse_sites(options.sites) for layer in parse_layers(options.layers, config.num_layers)}
    except UsageError as error:
        sys.exit(f"beam_extract.preview: {error}")
    tokenizer = load_tokenizer(resolve_model_dir(options.model, weights=False))
    estimate = OutputEstimate(hooks, OUTPUT_DTYPES[options.output_dtype].itemsize, options.output_dtype)
    views = range(options.views_per_task) if args.stats else range(args.view, args.view + 1)
    lengths, dropped, fitted, dead, shown = [], 0, 0, {}, 0
    for view, result in preview_samples(options, tokenizer, views, config.vocab_size):
        if isinstance(result, DeadLetter):
            dead[result.reason] = dead.get(result.reason, 0) + 1
            print(f"--- {result.source}:{result.line_number}: dead letter {result.reason}: {result.detail}")
            continue
        lengths.append(len(result.token_ids))
        dropped, fitted = dropped + result.train_dropped, fitted + bool(result.train_dropped)
        estimate.add(result)
        if shown < args.num and view == args.view:
            shown += 1
            print(f"=== {result.sample_id}: {len(result.token_ids)} tokens, "
                  f"{result.train_dropped} train examples dropped ===")
            print(tokenizer.decode(result.token_ids.tolist()))
            print()
        if shown >= args.num and not args.stats:
            break
    if args.stats:
        ordered = sorted(lengths) or [0]
        print(f"{len(lengths)} samples: tokens min {ordered[0]}, median {statistics.median(ordered):.0f}, "
              f"p90 {ordered[math.ceil(0.9 * len(ordered)) - 1]}, max {ordered[-1]}; {dropped} train examples "
              f"dropped from {fitted} ARC prompts to fit --max_seq_len; dead letters: {dead or 'none'}")
        print(estimate.report())
    sys.stdout.flush()


if __name__ == "__main__":
    main()
