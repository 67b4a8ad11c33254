"""`python -m beam_extract.preview`: the first prompts exactly as the model will see them.

Loads only the tokenizer (no weights), so prompts can be checked before paying for accelerators.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Iterator

from beam_extract.arc.augment import ArcView, augment
from beam_extract.arc.encoders import DEFAULT_ENCODER, parse_encoder
from beam_extract.arc.prompt import DEFAULT_TEMPLATE, load_template
from beam_extract.io.sources import match_paths, read_lines
from beam_extract.model.weights import resolve_model_dir
from beam_extract.options import DEFAULT_MODEL, sample_input
from beam_extract.records import DeadLetter, parse_line
from beam_extract.records.arc import ArcTask
from beam_extract.records.identity import input_root
from beam_extract.tokenize import PromptSettings, Sample, TokenSelection, load_tokenizer, to_samples


def preview_samples(args: argparse.Namespace, tokenizer) -> Iterator[Sample | DeadLetter]:
    """What the pipeline's parse, augment and tokenize stages make of the input, in input order."""
    settings = PromptSettings(load_template(args.prompt_template), args.grid_encoder,
                              parse_encoder(args.grid_encoder), args.include_answer)
    for path in match_paths(args.input):
        for line in read_lines(path):
            record = line if isinstance(line, DeadLetter) else parse_line(line, args.input_format, args.text_field,
                                                                          input_root(args.input))
            if isinstance(record, DeadLetter):
                yield record
                continue
            if isinstance(record, ArcTask):
                record = ArcView(*augment(record, args.seed, args.view))
            yield from to_samples(record, tokenizer, settings, args.max_seq_len, TokenSelection())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m beam_extract.preview", description=__doc__)
    parser.add_argument("--input", default=sample_input(), help="Glob of JSONL files (default: packaged samples)")
    parser.add_argument("--input_format", default="auto", choices=("auto", "arc", "text"))
    parser.add_argument("--text_field", default="text")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="Model whose tokenizer and chat template to use")
    parser.add_argument("--num", type=int, default=3, help="Prompts to print")
    parser.add_argument("--view", type=int, default=0, help="ARC augmented view to show")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt_template", default=DEFAULT_TEMPLATE)
    parser.add_argument("--grid_encoder", default=DEFAULT_ENCODER)
    parser.add_argument("--include_answer", action="store_true")
    parser.add_argument("--max_seq_len", type=int, default=8192)
    parser.add_argument("--stats", action="store_true",
                        help="Read the whole input and print token-length statistics at the end")
    args = parser.parse_args(argv)

    tokenizer = load_tokenizer(resolve_model_dir(args.model, weights=False))
    lengths, dropped, dead, shown = [], 0, {}, 0
    for result in preview_samples(args, tokenizer):
        if isinstance(result, DeadLetter):
            dead[result.reason] = dead.get(result.reason, 0) + 1
            print(f"--- {result.source}:{result.line_number}: dead letter {result.reason}: {result.detail}")
        else:
            lengths.append(len(result.token_ids))
            dropped += bool(result.train_dropped)
            if shown < args.num:
                shown += 1
                print(f"=== {result.sample_id}: {len(result.token_ids)} tokens, "
                      f"{result.train_dropped} train examples dropped ===")
                print(tokenizer.decode(result.token_ids.tolist()))
                print()
        if shown >= args.num and not args.stats:
            break
    if lengths:
        ordered = sorted(lengths)
        print(f"{len(lengths)} prompts: tokens min {ordered[0]}, median {statistics.median(ordered):.0f}, "
              f"p90 {ordered[int(0.9 * (len(ordered) - 1))]}, max {ordered[-1]}; {dropped} dropped train "
              f"examples to fit; dead letters: {dead or 'none'}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
