"""Names in an output directory that readers look for, and reading the manifest: light (no Beam),
so that readers of the output import it where the pipeline's modules cannot be imported."""

from __future__ import annotations

from beam_extract.format.storage import read_json

MANIFEST_NAME = "manifest.json"  # OUT/manifest.json: a finished run
WINDOWS = "_windows"  # OUT/_windows/{start}-{end}.json: a streaming job's closed windows


def read_manifest(output: str) -> dict:
    return read_json(f"{output.rstrip('/')}/{MANIFEST_NAME}")
