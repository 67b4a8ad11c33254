"""Command-line options of the extraction job, as a PipelineOptions subclass (works on every runner
and as Flex Template parameters)."""

from __future__ import annotations

import argparse
from importlib import resources

from apache_beam.options.pipeline_options import PipelineOptions

from beam_extract.arc.encoders import DEFAULT_ENCODER
from beam_extract.arc.prompt import BUILTIN_TEMPLATES, DEFAULT_TEMPLATE
from beam_extract.batching import PACKING_MODES
from beam_extract.legacy import add_legacy_arguments
from beam_extract.model.qwen2 import SITES
from beam_extract.output.schema import OUTPUT_DTYPES

INPUT_FORMATS = ("auto", "arc", "text")
COMPUTE_DTYPES = ("float32", "bfloat16")
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
        elif flag(value):
            rewritten.append(name)
    return rewritten


def sample_input() -> str:
    """The glob of the sample data shipped in the package (ARC tasks and text documents)."""
    return str(resources.files("beam_extract").joinpath("data")) + "/sample_*.jsonl"


class ExtractOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        data = parser.add_argument_group("beam-extract: input")
        data.add_argument("--input", default=None,
                          help="Glob of JSONL files, local or gs://, .gz allowed (default: the packaged samples)")
        data.add_argument("--input_format", default="auto", choices=INPUT_FORMATS,
                          help="arc (ARC-AGI tasks), text (one document per line), or auto (per line: "
                               "an object with 'train' is an ARC task, anything else text)")
        data.add_argument("--text_field", default="text", help="JSON field holding a text document's text")
        data.add_argument("--max_seq_len", type=int, default=8192,
                          help="Longest sequence in tokens: text is split into windows of this size; ARC "
                               "prompts drop train examples from the end to fit, else are dead-lettered (too_long)")

        arc = parser.add_argument_group("beam-extract: ARC tasks")
        arc.add_argument("--views_per_task", type=int, default=8,
                         help="Augmented views per task, cycling through the 8 rotations/flips, each with its "
                              "own colour permutation and train order")
        arc.add_argument("--seed", type=int, default=0, help="Seed of the augmentation (with task id and view)")
        arc.add_argument("--prompt_template", default=DEFAULT_TEMPLATE,
                         help=f"{' or '.join(BUILTIN_TEMPLATES)}, or the path of a Jinja2 template file")
        arc.add_argument("--grid_encoder", default=DEFAULT_ENCODER, help="Grid encoder, by name")
        arc.add_argument("--include_answer", type=flag, nargs="?", const=True, default=False,
                         help="Render the test output, when present, after the answer prefix (train prompts)")

        model = parser.add_argument_group("beam-extract: model")
        model.add_argument("--model", default=DEFAULT_MODEL,
                           help="Hugging Face-format Qwen2 directory (local or gs://), a hub id when online, "
                                f"or {DEFAULT_MODEL} (embedded, generated offline)")
        model.add_argument("--layers", default="all",
                           help="Layers to capture: 'all' or a list like 0,3,8-11 (0-based)")
        model.add_argument("--sites", default="resid_post",
                           help=f"Comma-separated sites: {', '.join(SITES)}")
        model.add_argument("--dtype", default="float32", choices=COMPUTE_DTYPES, help="Compute dtype")
        model.add_argument("--mesh", default="auto",
                           help="Device mesh over each worker's local devices: auto (all on 'data' while the "
                                "weights fit one device, else split on 'model'), or axes like data:4,model:2")

        batching = parser.add_argument_group("beam-extract: batching")
        batching.add_argument("--batch_size", type=int, default=8,
                              help="Rows per forward batch (fixed, so each row length compiles once)")
        batching.add_argument("--tokens_per_batch", type=int, default=0,
                              help="If set, rows per batch = tokens_per_batch // row length instead of batch_size")
        batching.add_argument("--buckets", default="multiples:32",
                              help="Row lengths of unpacked samples: multiples:N, pow2, or a list like 512,2048,8192 "
                                   "(max_seq_len is always the last)")
        batching.add_argument("--packing", default="text", choices=PACKING_MODES,
                              help="Pack several samples per row (own segment, positions from 0): text documents, "
                                   "all samples (ARC prompts too), or off")
        batching.add_argument("--pack_length", type=int, default=0,
                              help="Row length of packed rows (default 0: max_seq_len); longer samples use buckets. "
                                   "Attention skips tiles between packed samples, so long rows cost little extra")

        out = parser.add_argument_group("beam-extract: output")
        out.add_argument("--output", default="activations", help="Output directory, local or gs://")
        out.add_argument("--output_dtype", default="float32", choices=tuple(OUTPUT_DTYPES),
                         help="Storage dtype of the activations")
        out.add_argument("--exclude_special_tokens", type=flag, nargs="?", const=True, default=True,
                         help="Do not store <|endoftext|>, <|im_start|>, <|im_end|> and pad tokens "
                              "(they still run through the model)")
        out.add_argument("--positions", default=":",
                         help="Python-style slice of each sequence's positions to store, e.g. -64: or 0:512")
        out.add_argument("--arc_tokens", default="all", choices=("all", "test"),
                         help="ARC: store every prompt token, or only the test input and the answer part")
        out.add_argument("--shuffle", type=flag, nargs="?", const=True, default=False,
                         help="Shuffle samples across documents and files before batching, and records within "
                              "each file (seeded by --seed), so consecutive records come from different documents")
        out.add_argument("--shard_size_mb", type=int, default=256,
                         help="Start a new TFRecord file once one reaches this size")
        out.add_argument("--resume", type=flag, nargs="?", const=True, default=False,
                         help="Continue an interrupted run into the same --output: samples it already "
                              "committed are skipped, nothing is written twice")

        streaming = parser.add_argument_group("beam-extract: streaming (with Beam's --streaming)")
        streaming.add_argument("--poll_interval", type=int, default=60,
                               help="Seconds between listings of --input for new files; each file is read once")
        streaming.add_argument("--window_seconds", type=int, default=600,
                               help="Output is grouped into fixed windows of this many seconds of arrival time: "
                                    "each window gets its own files and an index in OUT/_windows/")
        streaming.add_argument("--flush_seconds", type=int, default=60,
                               help="A partial batch is extracted once its first sample has waited this long, so "
                                    "a trickle of input does not wait for the end of its window")
        add_legacy_arguments(parser)


def parse_layers(spec: str, num_layers: int) -> tuple[int, ...]:
    """'all' or '0,3,8-11' -> sorted layer indices, each checked against the model's depth."""
    if spec.strip() == "all":
        return tuple(range(num_layers))
    layers = set()
    for part in spec.split(","):
        first, _, last = part.strip().partition("-")
        try:
            layers.update(range(int(first), int(last or first) + 1))
        except ValueError:
            raise ValueError(f"--layers {spec!r}: {part!r} is not a layer or a range a-b") from None
    if not layers or min(layers) < 0 or max(layers) >= num_layers:
        raise ValueError(f"--layers {spec!r}: the model has layers 0..{num_layers - 1}")
    return tuple(sorted(layers))


def parse_sites(spec: str) -> tuple[str, ...]:
    sites = tuple(dict.fromkeys(s.strip() for s in spec.split(",") if s.strip()))
    unknown = [s for s in sites if s not in SITES]
    if unknown or not sites:
        raise ValueError(f"--sites {spec!r}: choose from {', '.join(SITES)}")
    return sites


def extract_options(options: PipelineOptions) -> dict:
    """Our options (not Beam's or the cloud's, which may hold credentials) as a plain dict."""
    parser = argparse.ArgumentParser()
    ExtractOptions._add_argparse_args(parser)
    view = options.view_as(ExtractOptions)
    return {action.dest: getattr(view, action.dest) for action in parser._actions if is_ours(action)}


def is_ours(action: argparse.Action) -> bool:
    """Our current options; not --help, and not the old scripts' hidden flags."""
    return action.dest != "help" and action.help != argparse.SUPPRESS
