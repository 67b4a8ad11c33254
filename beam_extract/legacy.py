"""The old extraction scripts' flags, accepted so their users' command lines keep working.

Each renamed flag sets our option and says once which flag replaces it; flags that mean nothing in
a Beam pipeline are accepted with a notice saying what replaces them, never silently ignored.
"""

from __future__ import annotations

import argparse
import logging

from apache_beam.options.pipeline_options import PipelineOptions

_LOG = logging.getLogger("beam_extract")
_NOTICES: set[str] = set()  # Beam parses the command line more than once; say each thing once

# old flag -> (our option, how to convert its value: a mapping, a type, or None)
RENAMED = {
    "model_path": ("model", None),
    "dataset_path": ("input", None),
    "layers_to_extract": ("layers", None),
    "activation_type": ("sites", {"residual": "resid_post", "mlp": "mlp_out", "attn": "attn_out"}),
    "max_seq_length": ("max_seq_len", int),
    "predictions_per_task": ("views_per_task", int),
    "prompt_version": ("prompt_template", None),
    "random_seed": ("seed", int),
    "output_dir": ("output", None),
}
# old flag -> what replaces it
RETIRED = {
    "machine_id": "Beam distributes the work over workers",
    "total_machines": "Beam distributes the work over workers",
    "multihost": "each Beam worker is one host with its own --mesh",
    "coordinator_address": "each Beam worker is one host with its own --mesh",
    "host_id": "each Beam worker is one host with its own --mesh",
    "num_hosts": "each Beam worker is one host with its own --mesh",
    "mesh_type": "--mesh (e.g. data:4,model:2)",
    "shard_size_gb": "--shard_size_mb",
    "compress_shards": "TFRecord output stores real tokens only in the --output_dtype you choose",
    "delete_local_after_upload": "--output writes to gs:// directly",
    "enable_barrier_sync": "Beam coordinates the workers",
    "checkpoint_dir": "--resume (completed batches are committed in --output)",
    "checkpoint_interval": "--resume (completed batches are committed in --output)",
    "resume_from_checkpoint": "--resume",
    "max_tasks": "select tasks in the input (e.g. a file with the first N lines)",
}
# Combined into --output and --input by legacy_rewrites().
GCS_FLAGS = ("gcs_bucket", "gcs_prefix", "upload_to_gcs")
SHARDED_FLAGS = ("use_sharded_dataset", "sharded_dataset_dir")


def notice(text: str) -> None:
    if text not in _NOTICES:
        _NOTICES.add(text)
        _LOG.warning(text)


class _Renamed(argparse.Action):
    def __init__(self, option_strings, dest, new_name, convert, **kwargs):
        super().__init__(option_strings, dest=new_name, default=argparse.SUPPRESS, **kwargs)
        self._old, self._convert = option_strings[0], convert

    def __call__(self, parser, namespace, value, option_string=None):
        if isinstance(self._convert, dict):
            if value not in self._convert:
                parser.error(f"{self._old}: expected one of {', '.join(self._convert)}")
            value = self._convert[value]
        elif self._convert:
            try:
                value = self._convert(value)
            except ValueError:
                parser.error(f"{self._old}: {value!r} is not a whole number")
        notice(f"{self._old} is deprecated: it now sets --{self.dest}={value}")
        setattr(namespace, self.dest, value)


class _Retired(argparse.Action):
    def __init__(self, option_strings, dest, replacement, **kwargs):
        super().__init__(option_strings, dest=argparse.SUPPRESS, nargs="?", default=argparse.SUPPRESS, **kwargs)
        self._replacement = replacement

    def __call__(self, parser, namespace, value, option_string=None):
        notice(f"{option_string} no longer applies and is ignored: {self._replacement}")


def add_legacy_arguments(parser) -> None:
    """Called by ExtractOptions, so its view parses them into our options. Hidden from --help and
    from the template: they exist for old command lines only."""
    for old, (new, convert) in RENAMED.items():
        parser.add_argument(f"--{old}", action=_Renamed, new_name=new, convert=convert, help=argparse.SUPPRESS)
    for old, replacement in RETIRED.items():
        parser.add_argument(f"--{old}", action=_Retired, replacement=replacement, help=argparse.SUPPRESS)
    parser.add_argument("--gcs_bucket", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--gcs_prefix", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--upload_to_gcs", nargs="?", const="true", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--use_sharded_dataset", nargs="?", const="true", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--sharded_dataset_dir", default=None, help=argparse.SUPPRESS)


def legacy_rewrites(options: PipelineOptions, ours):
    """Applies the old flags that combine into one of ours (--input, --output) to `ours`
    (options.JobOptions), returning the result. They are read from all parsed options, not through
    ExtractOptions' view: options.py registers these flags, so it imports this module, never the
    reverse."""
    legacy = options.get_all_options()
    if legacy.get("sharded_dataset_dir"):
        ours = ours.replace(input=legacy["sharded_dataset_dir"])
        notice(f"--use_sharded_dataset --sharded_dataset_dir are deprecated: use --input={ours.input}")
    if legacy.get("gcs_bucket"):
        prefix = (legacy.get("gcs_prefix") or "activations").strip("/")
        ours = ours.replace(output=f"gs://{legacy['gcs_bucket']}/{prefix}")
        notice(f"--gcs_bucket/--gcs_prefix/--upload_to_gcs are deprecated: use --output={ours.output}")
    return ours
