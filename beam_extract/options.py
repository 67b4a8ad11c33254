"""Command-line options of the extraction job, as a PipelineOptions subclass (works on every runner
and as Flex Template parameters)."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
from collections.abc import Callable
from importlib import resources

from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

from beam_extract.arc.encoders import DEFAULT_ENCODER
from beam_extract.arc.prompt import BUILTIN_TEMPLATES, DEFAULT_TEMPLATE
from beam_extract.format.schema import OUTPUT_DTYPES
from beam_extract.hooks import SITES
from beam_extract.legacy import add_legacy_arguments
from beam_extract.model.config import COMPUTE_DTYPES

PACKING_MODES = ("text", "all", "off")  # which samples are packed: text only, ARC prompts too, none
DEFAULT_MODEL = "tiny-random-qwen2"


def flag(value: str) -> bool:
    """On/off options take `--name` or `--name=true|false`, since templates always pass a value."""
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {value!r}")


def template_switches(argv: list[str]) -> list[str]:
    """Beam's own on/off --streaming as a template passes it, `--streaming=true|false`, rewritten
    to the form Beam parses (`--streaming`, or nothing)."""
    rewritten = []
    for arg in argv:
        name, equals, value = arg.partition("=")
        if name != "--streaming" or not equals:
            rewritten.append(arg)
            continue
        try:
            if flag(value):
                rewritten.append(name)
        except argparse.ArgumentTypeError as error:
            raise UsageError(f"--streaming: {error}") from None
    return rewritten


def sample_input() -> str:
    """The glob of the sample data shipped in the package (ARC tasks and text documents)."""
    return str(resources.files("beam_extract").joinpath("data")) + "/sample_*.jsonl"


class UsageError(Exception):
    """A mistake in the command line, said in one line that names the option and what it accepts.
    Raised in the driver before the graph is built; printed without a traceback, exit code 2."""


@dataclasses.dataclass(frozen=True)
class Option:
    """One of our options: the one description the CLI, --help, the Flex Template's parameters and
    the driver's checks are made from."""

    name: str
    default: object
    help: str
    group: str
    kind: Callable = str  # str, int or flag
    choices: tuple[str, ...] = ()
    minimum: int | None = None
    maximum: int | None = None
    # Whether the option's value is in the run's fingerprint (resume.py), so that a --resume with
    # another value is refused: true for every option that decides which samples exist or what
    # their activations are. Required, so that no new option is left out by omission. False for
    # the rest, and for those the fingerprint identifies otherwise: --model by its weights and
    # tokenizer, --layers and --sites by the hooks, --prompt_template by its text, --input by
    # its files (io.inventory).
    fingerprinted: bool = dataclasses.field(kw_only=True)

    def accepted(self) -> str:
        """What the option accepts, for --help and for errors."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.kind is flag:
            return "true or false"
        if self.minimum is not None and self.maximum is not None:
            return f"{self.minimum} to {self.maximum}"
        if self.minimum is not None:
            return f"at least {self.minimum}"
        return ""


MAX_SEQ_LEN = 1 << 20  # positions past this are beyond any model we load, and beyond host memory per row
OPTIONS: tuple[Option, ...] = (
    Option("input", None, "Glob of input files, local or gs://: JSONL (.gz and other compressions allowed), Parquet "
           "(.parquet), Arrow (.arrow), or a directory written by datasets' save_to_disk (default: the packaged "
           "samples)", "input", fingerprinted=False),
    Option("input_format", "auto", "arc (ARC-AGI tasks), text (one document per line or row), tokens (rows of "
           "token ids, no tokenizer runs), or auto (per line or row: an object with 'train' is an ARC task, "
           "anything else text)", "input", choices=("auto", "arc", "text", "tokens"), fingerprinted=True),
    Option("text_field", "text", "Field holding a text document's text; a dotted path reads a nested field "
           "(meta.text)", "input", fingerprinted=True),
    Option("id_field", "id", "Field holding a document's own id (a string or an integer), kept as doc_id; dotted "
           "paths allowed", "input", fingerprinted=True),
    Option("tokens_field", "", "--input_format tokens: the field holding a row's token ids (default: input_ids, "
           "else tokens)", "input", fingerprinted=True),
    Option("prepend_bos", False, "--input_format tokens: put the tokenizer's own text prefix (its BOS, as text "
           "windows get; nothing for Qwen) before each window. Off: ids are taken as they are, as SAELens's "
           "pre-tokenized datasets already begin each row with a BOS", "input", flag, fingerprinted=True),
    Option("max_line_bytes", 64 << 20, "Longest input line in bytes (of a table row: its text): a longer one is a "
           "line_too_long dead letter, a line read past without being held in memory", "input", int, minimum=1024,
           maximum=1 << 30, fingerprinted=True),
    Option("max_expansion", 200, "Most bytes a compressed input file may decode to per compressed byte (past its "
           "first 64 KiB): the rest of a file over it is an expansion_too_large dead letter", "input", int,
           minimum=1, maximum=1 << 20, fingerprinted=True),
    Option("special_tokens_in_text", False, "Tokenize chat markers written in a document's text (<|im_end|>) as "
           "control tokens, as the first release did; by default they are characters like any others and only "
           "ARC prompts' chat template inserts control tokens", "input", flag, fingerprinted=True),
    Option("max_seq_len", 8192, "Longest sequence in tokens: text is split into windows of this size; ARC prompts "
           "drop train examples from the end to fit, else are dead-lettered (too_long)", "input", int,
           minimum=16, maximum=MAX_SEQ_LEN, fingerprinted=True),
    Option("views_per_task", 8, "Augmented views per task, cycling through the 8 rotations/flips, each with its "
           "own colour permutation and train order", "ARC tasks", int, minimum=1, maximum=1024, fingerprinted=True),
    Option("seed", 0, "Seed of the augmentation (with task id and view) and of --shuffle", "ARC tasks", int,
           minimum=0, maximum=2**63 - 1, fingerprinted=True),
    Option("prompt_template", DEFAULT_TEMPLATE, f"{' or '.join(BUILTIN_TEMPLATES)}, or the path of a Jinja2 "
           "template file", "ARC tasks", fingerprinted=False),
    Option("grid_encoder", DEFAULT_ENCODER, "Grid encoder, by name", "ARC tasks", fingerprinted=True),
    Option("include_answer", False, "Render the test output, when present, after the answer prefix (train prompts)",
           "ARC tasks", flag, fingerprinted=True),
    Option("model", DEFAULT_MODEL, "Hugging Face-format model directory (local or gs://; see README, Model "
           f"families), a hub id when online, or {DEFAULT_MODEL} (embedded, generated offline)", "model",
           fingerprinted=False),
    Option("layers", "all", "Layers to capture: 'all' or a list like 0,3,8-11 (0-based)", "model", fingerprinted=False),
    Option("sites", "resid_post", f"Comma-separated sites: {', '.join(SITES)}", "model", fingerprinted=False),
    Option("dtype", "float32", "Compute dtype", "model", choices=tuple(COMPUTE_DTYPES), fingerprinted=True),
    Option("mesh", "auto", "Device mesh over each worker's local devices: auto (all on 'data' while the weights "
           "fit one device, else split on 'model'), or axes like data:4,model:2", "model", fingerprinted=False),
    Option("compilation_cache_dir", "", "Persistent compilation cache, local or gs://: a worker loads the forwards "
           "compiled by earlier workers and jobs instead of compiling them again (default: on Dataflow "
           "{temp_location}/beam-extract-compile-cache/jax-{version}; elsewhere each worker's machine's "
           "$BEAM_EXTRACT_CACHE/compile-cache/jax-{version}, ~/.cache/beam_extract by default; none: off). Only "
           "the job's own principals may write there", "model", fingerprinted=False),
    Option("batch_size", 8, "Rows per forward batch (fixed, so each row length compiles once)", "batching", int,
           minimum=1, maximum=65536, fingerprinted=False),
    Option("tokens_per_batch", 0, "If set, rows per batch = tokens_per_batch // row length instead of batch_size",
           "batching", int, minimum=0, maximum=1 << 30, fingerprinted=False),
    Option("buckets", "geometric:1.5", "Row lengths of unpacked samples and of a small job's last packed rows: "
           "geometric:R (each power of two from 32, times R, R^2, ... below the next, rounded up to multiples of "
           "32; R from 1.01 to 2), multiples:N, pow2, or a list like 512,2048,8192 (max_seq_len is always the "
           "last). Each length compiles once per worker: the default's few lengths (10 on ARC-AGI-1, at 0.82 real "
           "per computed token) cost less than finer ones' padding saves (benchmarks/padding.py)", "batching",
           fingerprinted=False),
    Option("packing", "text", "Pack several samples per row (own segment, positions from 0): text documents, all "
           "samples (ARC prompts too), or off", "batching", choices=PACKING_MODES, fingerprinted=False),
    Option("pack_length", 0, "Row length of packed rows (0: max_seq_len); longer samples use buckets. Attention "
           "skips tiles between packed samples, so long rows cost little extra; the last, partial batch of a "
           "packing key that never filled a batch shrinks to the fewest rows (a power of two) and the shortest "
           "bucket that hold it", "batching", int, minimum=0, maximum=MAX_SEQ_LEN, fingerprinted=False),
    Option("output", "activations", "Output directory, local or gs://", "output", fingerprinted=False),
    Option("output_dtype", "float32", "Storage dtype of the activations", "output", choices=tuple(OUTPUT_DTYPES),
           fingerprinted=True),
    Option("exclude_special_tokens", True, "Do not store the tokenizer's special tokens: BOS, EOS, pad and the added "
           "tokens it marks special, such as Qwen's <|im_start|> and <|im_end|> (they still run through the model)",
           "output", flag, fingerprinted=True),
    Option("positions", ":", "Python-style slice of each sequence's positions to store, e.g. -64: or 0:512",
           "output", fingerprinted=True),
    Option("arc_tokens", "all", "ARC: store every prompt token, or only the test input and the answer part",
           "output", choices=("all", "test"), fingerprinted=True),
    Option("norm_exclude_first", 1, "The manifest's normalisation factors leave out each sequence's first N "
           "positions: the first token is an attention sink whose norm, many times the others' in Qwen models, "
           "would dominate them (0: every stored token)", "output", int, minimum=0, maximum=MAX_SEQ_LEN,
           fingerprinted=True),
    Option("shuffle", False, "Shuffle samples across documents and files before batching, and records within each "
           "file (seeded by --seed), so consecutive records come from different documents", "output", flag,
           fingerprinted=False),
    Option("shard_size_mb", 256, "Start a new TFRecord file once one reaches this size", "output", int, minimum=1,
           maximum=1 << 20, fingerprinted=False),
    Option("resume", False, "Continue an interrupted run into the same --output: samples it already committed are "
           "skipped, nothing is written twice", "output", flag, fingerprinted=False),
    Option("accept_software_change", False, "With --resume: continue a run whose recorded software (beam-extract, "
           "JAX, jaxlib, transformers, tokenizers) or device platform differs from this job's, whose activations "
           "may then differ beyond rounding; the differences accepted are recorded in the manifest", "output", flag,
           fingerprinted=False),
    Option("overwrite", False, "Delete the output of an earlier beam-extract run in --output first (never files "
           "beam-extract did not write)", "output", flag, fingerprinted=False),
    Option("poll_interval", 60, "Seconds between listings of --input for new files; each file is read once",
           "streaming (with Beam's --streaming)", int, minimum=1, maximum=86400, fingerprinted=False),
    Option("window_seconds", 600, "Output is grouped into fixed windows of this many seconds of arrival time: each "
           "window gets its own files and an index in OUT/_windows/", "streaming (with Beam's --streaming)", int,
           minimum=1, maximum=30 * 86400, fingerprinted=False),
    Option("flush_seconds", 60, "A partial batch is extracted once its first sample has waited this long, so a "
           "trickle of input does not wait for the end of its window", "streaming (with Beam's --streaming)", int,
           minimum=1, maximum=86400, fingerprinted=False),
)
BY_NAME = {option.name: option for option in OPTIONS}


def add_arguments(parser: argparse.ArgumentParser, show_defaults: bool = False) -> None:
    """Our options, in their groups; with `show_defaults` their help says the default and range."""
    groups = {}
    for option in OPTIONS:
        if option.group not in groups:
            groups[option.group] = parser.add_argument_group(f"beam-extract: {option.group}")
        text = option.help
        if show_defaults:
            accepted = option.accepted()
            shown = str(option.default).lower() if option.kind is flag else option.default
            text += f" [default: {shown}{'; ' + accepted if accepted else ''}]"
        extra = {"nargs": "?", "const": True} if option.kind is flag else {}
        groups[option.group].add_argument(f"--{option.name}", type=option.kind, default=option.default,
                                          choices=option.choices or None, help=text, **extra)


class ExtractOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        add_arguments(parser)
        add_legacy_arguments(parser)


def check_ranges(values: "JobOptions") -> None:
    """Numbers within their documented ranges (argparse checked types and choices)."""
    for option in OPTIONS:
        value = getattr(values, option.name)
        if option.kind is int and not (option.minimum or 0) <= value <= (option.maximum or value):
            raise UsageError(f"--{option.name} {value}: expected {option.accepted()}")


def parse_layers(spec: str, num_layers: int) -> tuple[int, ...]:
    """'all' or '0,3,8-11' -> sorted layer indices, each checked against the model's depth."""
    if spec.strip() == "all":
        return tuple(range(num_layers))
    layers = set()
    for part in spec.split(","):
        first, _, last = part.strip().partition("-")
        try:
            first, last = int(first), int(last or first)
        except ValueError:
            raise UsageError(f"--layers {spec!r}: {part!r} is not a layer or a range a-b") from None
        if not 0 <= first <= last < num_layers:  # checked before the range is built: 0-10**12 is no work
            raise UsageError(f"--layers {spec!r}: the model has layers 0..{num_layers - 1}")
        layers.update(range(first, last + 1))
    if not layers:
        raise UsageError(f"--layers {spec!r}: the model has layers 0..{num_layers - 1}")
    return tuple(sorted(layers))


def parse_sites(spec: str) -> tuple[str, ...]:
    sites = tuple(dict.fromkeys(s.strip() for s in spec.split(",") if s.strip()))
    unknown = [s for s in sites if s not in SITES]
    if unknown or not sites:
        raise UsageError(f"--sites {spec!r}: choose from {', '.join(SITES)}")
    return sites


def _as_dict(self) -> dict:
    """The options by name, in OPTIONS' order: what the manifest and the fingerprint record."""
    return {option.name: getattr(self, option.name) for option in OPTIONS}


def _replace(self, **changes) -> "JobOptions":
    return dataclasses.replace(self, **changes)


# A job's resolved options, typed and frozen: one attribute per Option, generated from OPTIONS so
# the list of options is written once. A misspelled name is an AttributeError, not a silent default.
JobOptions = dataclasses.make_dataclass(
    "JobOptions", [(option.name, option.kind if option.kind in (str, int) else bool) for option in OPTIONS],
    frozen=True, namespace={"as_dict": _as_dict, "replace": _replace})
JobOptions.__module__ = __name__  # pickled by reference, as Beam ships DoFns that hold them


def extract_options(options: PipelineOptions) -> JobOptions:
    """Our options (not Beam's or the cloud's, which may hold credentials)."""
    view = options.view_as(ExtractOptions)
    return JobOptions(**{option.name: getattr(view, option.name) for option in OPTIONS})


class _OneLineParser(_BeamArgumentParser):
    """Beam's parser (it knows value-provider arguments), with a mistake raised as a UsageError."""

    def error(self, message: str):
        raise UsageError(message)


def check_arguments(argv: list[str]) -> None:
    """Every argument is an option of ours or of one of Beam's option classes, with a value of its
    type and choices. Beam only logs a warning for an unknown one and runs with the defaults, so a
    misspelled --output_dytpe would go unnoticed; its own errors print the whole usage."""
    parser = _OneLineParser(allow_abbrev=False, add_help=False)
    for options_class in {str(c): c for c in PipelineOptions.__subclasses__()}.values():
        options_class._add_argparse_args(parser)  # as Beam collects them (PipelineOptions.get_all_options)
    known, unknown = parser.parse_known_args(argv)
    if known.flink_submit_uber_jar or known.spark_submit_uber_jar:
        return  # Beam then passes the arguments it does not know to the Java side, which may know them
    if unknown:
        name = unknown[0].split("=", 1)[0]
        if not name.startswith("-"):
            raise UsageError(f"unexpected argument {unknown[0]!r}: options are written --name=value")
        names = [o for action in parser._actions for o in action.option_strings]  # as Beam's warning finds them
        close = difflib.get_close_matches(name, names, n=1)
        raise UsageError(f"{name}: no such option" + (f"; did you mean {close[0]}?" if close else " (see --help)"))
