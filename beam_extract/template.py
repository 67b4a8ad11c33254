"""`python -m beam_extract.template`: templates/metadata.json for the Dataflow Flex Template, generated
from ExtractOptions so the template's parameters are exactly our options.

    python -m beam_extract.template            # rewrite templates/metadata.json
    python -m beam_extract.template --check    # exit 1 if the checked-in file is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from beam_extract.options import ExtractOptions, flag, is_ours

METADATA = Path(__file__).resolve().parent.parent / "templates" / "metadata.json"
GCS_PATH = r"^gs:\/\/[^\n\r]+$"
# On Dataflow the output must be on Cloud Storage (workers share no local disk), so it has no default.
GCS_PARAMETERS = {"output"}


def _regexes(action: argparse.Action) -> list[str]:
    if action.dest in GCS_PARAMETERS:
        return [GCS_PATH]
    if action.choices:
        return ["^(" + "|".join(action.choices) + ")$"]
    if action.type is int:
        return [r"^[0-9]+$"]
    if action.type is flag:
        return ["^(true|false)$"]
    return []


def template_metadata() -> dict:
    parser = argparse.ArgumentParser()
    ExtractOptions._add_argparse_args(parser)
    parameters = []
    for action in parser._actions:
        if not is_ours(action):
            continue
        parameter = {
            "name": action.dest,
            "label": action.dest.replace("_", " ").capitalize(),
            "helpText": action.help,
            "isOptional": action.dest not in GCS_PARAMETERS,
        }
        if action.type is flag:
            parameter["defaultValue"] = str(action.default).lower()
        elif action.default is not None and action.dest not in GCS_PARAMETERS:
            parameter["defaultValue"] = str(action.default)
        if regexes := _regexes(action):
            parameter["regexes"] = regexes
        parameters.append(parameter)
    return {
        "name": "beam-extract",
        "description": "Per-token Qwen2 activations from JSONL (ARC-AGI tasks or text) into TFRecords for SAE "
                       "training, on CPU, GPU or TPU workers.",
        "parameters": parameters,
    }


def render() -> str:
    return json.dumps(template_metadata(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m beam_extract.template", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="Fail if templates/metadata.json is stale")
    args = parser.parse_args(argv)
    if args.check:
        if not METADATA.exists() or METADATA.read_text() != render():
            sys.exit(f"{METADATA} is stale: run python -m beam_extract.template")
        return
    METADATA.write_text(render())
    print(f"wrote {METADATA}")


if __name__ == "__main__":
    main()
