"""The driver's checks of option values against the model: --positions, a record's size at
--max_seq_len, and a dry render of a built-in ARC task and text document the way the job will render
its input (so options that would dead-letter every sample fail before any worker starts)."""

from __future__ import annotations

from collections.abc import Callable

from beam_extract.arc.augment import ArcView, augment
from beam_extract.format.schema import OUTPUT_DTYPES
from beam_extract.model.config import ModelConfig
from beam_extract.model.weights import resolve_model_dir
from beam_extract.options import JobOptions, UsageError
from beam_extract.records.arc import ArcTask
from beam_extract.records.dead_letter import DeadLetter
from beam_extract.records.text import TextDoc
from beam_extract.records.tokens import TokenDoc
from beam_extract.stages import prompt_and_selection
from beam_extract.tokenize import load_tokenizer, parse_positions, special_affixes, text_token_ids, to_samples


def usage(check: Callable, *args):
    """A parser of ours that raises ValueError for a bad value: its message becomes a usage error."""
    try:
        return check(*args)
    except ValueError as error:
        raise UsageError(str(error)) from None


def check_positions(options: JobOptions) -> None:
    """--positions parses, and stores some position that the normalisation factors count."""
    positions = usage(parse_positions, options.positions)
    if (positions.start or 0) >= 0 and positions.stop is not None and 0 < positions.stop <= options.norm_exclude_first:
        raise UsageError(f"--positions {options.positions} stores only positions below --norm_exclude_first "
                         f"{options.norm_exclude_first}: the normalisation factors would count no token; lower "
                         "--norm_exclude_first")


# A tf.train.Example over 2 GiB cannot be parsed back (protobuf's limit); room for the scalar features.
MAX_RECORD_BYTES = 2**31 - 2**24


def check_record_size(options: JobOptions, config: ModelConfig) -> None:
    """A sequence of --max_seq_len tokens makes a record that can be read back."""
    # A token's activations, and its id, position and id in the sequence (varints of up to 10 bytes).
    token_bytes = config.hidden_size * OUTPUT_DTYPES[options.output_dtype].itemsize + 3 * 10
    record_bytes = options.max_seq_len * token_bytes
    if record_bytes > MAX_RECORD_BYTES:  # protobuf cannot read a message over 2 GiB back
        raise UsageError(f"--max_seq_len {options.max_seq_len}: a sequence's record would hold up to "
                         f"{record_bytes / 2**30:.1f} GiB ({config.hidden_size} x "
                         f"{options.output_dtype} and 3 token ids per token), over the {MAX_RECORD_BYTES / 2**30:.1f} GiB a record "
                         f"can be read back with; use at most {MAX_RECORD_BYTES // token_bytes}")


DRY_TASK = ArcTask("dry-run", (((((1, 0), (0, 2)), ((2, 0), (0, 1))),)), ((((0, 1), (1, 0)), ((1, 0), (0, 1))),),
                   "<built-in>", 1)
DRY_TEXT = TextDoc("<built-in>:1", "A short document to check the options with, before any worker starts.",
                   "<built-in>", 1)


def dry_render(options: JobOptions, vocab_size: int, created: str) -> None:
    """Renders a built-in ARC task and text document the way the job will, so a template, encoder,
    length or token selection that would dead-letter every sample fails now, in one line."""
    tokenizer = load_tokenizer(resolve_model_dir(options.model, weights=False))
    settings, selection = prompt_and_selection(options, tokenizer, created)
    fmt = options.input_format
    checks = []
    if fmt in ("text", "auto"):
        checks.append(("a text document", DRY_TEXT, ()))
    if fmt == "tokens":
        if options.prepend_bos and not len(special_affixes(tokenizer)[0]):
            raise UsageError(f"--prepend_bos: the tokenizer of --model {options.model} puts nothing before a text "
                             "(no BOS); leave it off")
        ids = text_token_ids(tokenizer, DRY_TEXT.text, not options.special_tokens_in_text)
        checks.append(("a row of token ids", TokenDoc(DRY_TEXT.key, tuple(ids.tolist()), DRY_TEXT.source, 1), ()))
    if fmt in ("arc", "auto"):
        # Under `auto` the input may hold no ARC task: only a template or encoder that fails counts
        # (a base model without a chat template still runs text; its ARC tasks are dead letters).
        checks.append(("an ARC task", ArcView(*augment(DRY_TASK, options.seed, 0)), () if fmt == "arc" else
                       ("too_long", "no_tokens_selected", "no_chat_template")))
    for what, record, tolerated in checks:
        results = to_samples(record, tokenizer, settings, options.max_seq_len, selection,
                             not options.special_tokens_in_text, vocab_size, options.prepend_bos)
        failed = [r for r in results if isinstance(r, DeadLetter) and r.reason not in tolerated]
        if failed and all(isinstance(r, DeadLetter) for r in results):
            raise UsageError(f"these options turn {what} into a dead letter ({failed[0].reason}: "
                             f"{failed[0].detail[:200]}): every sample like it would be; check --model, "
                             "--prompt_template, --grid_encoder, --max_seq_len, --positions and --arc_tokens")
