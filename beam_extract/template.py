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

from beam_extract.options import OPTIONS, Option, flag

METADATA = Path(__file__).resolve().parent.parent / "templates" / "metadata.json"
GCS_PATH = r"^gs:\/\/[^\n\r]+$"
# On Dataflow the output must be on Cloud Storage (workers share no local disk), so it has no default.
GCS_PARAMETERS = {"output"}


def _regexes(option: Option) -> list[str]:
    if option.name in GCS_PARAMETERS:
        return [GCS_PATH]
    if option.choices:
        return ["^(" + "|".join(option.choices) + ")$"]
    if option.kind is int:
        return [r"^[0-9]+$"]
    if option.kind is flag:
        return ["^(true|false)$"]
    return []


def template_metadata() -> dict:
    parameters = []
    for option in OPTIONS:
        accepted = option.accepted()
        parameter = {
            "name": option.name,
            "label": option.name.replace("_", " ").capitalize(),
            "helpText": option.help + (f" ({accepted})" if accepted and option.kind is int else ""),
            "isOptional": option.name not in GCS_PARAMETERS,
        }
        if option.kind is flag:
            parameter["defaultValue"] = str(option.default).lower()
        elif option.default is not None and option.name not in GCS_PARAMETERS:
            parameter["defaultValue"] = str(option.default)
        if regexes := _regexes(option):
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
