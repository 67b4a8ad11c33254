"""Every code block of the README runs in a test, taken from README.md as it stands (never copied).

Python blocks run here, on a run of the default job, or in the test file that owns their section
(which extracts them by their heading). Shell blocks: each `python -m beam_extract` command's
arguments pass the CLI's argument check (known options, values of their types and choices); the
commands themselves name models and buckets a test cannot have."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")

# The section (heading without its #s) -> where its python blocks run.
PYTHON_RUN_BY = {
    "Reading it back": "here",
    "The model API": "here",
    "Without beam-extract": "tests/test_reading_without_the_package.py",
    "Train an SAE from the output": "tests/test_integrations.py",
}


def blocks(language: str) -> list[tuple[str, str]]:
    """(the heading above it, code) of every fenced block of `language`, in order."""
    found, heading, fence = [], None, None
    for line in README.splitlines(keepends=True):
        if fence is None and line.startswith("```"):
            fence, code = line[3:].strip(), []
        elif fence is not None and line.startswith("```"):
            if fence == language:
                found.append((heading, "".join(code)))
            fence = None
        elif fence is not None:
            code.append(line)
        elif line.startswith("#"):
            heading = line.lstrip("#").strip()
    return found


def test_every_python_block_has_a_test():
    python = blocks("python")
    assert len(python) >= 8
    assert not [heading for heading, _ in python if heading not in PYTHON_RUN_BY]
    for heading, where in PYTHON_RUN_BY.items():
        assert heading in {h for h, _ in python}, f"no python block under {heading!r} any more"
        assert where == "here" or heading in (ROOT / where).read_text(), f"{where} does not run {heading!r}"


@pytest.fixture(scope="module")
def output_of_mlp_sites(tmp_path_factory):
    """The default job with the sites the README's snippets read (every layer of the tiny model)."""
    from beam_extract.pipeline import run

    workdir = tmp_path_factory.mktemp("readme")
    run(["--runner=DirectRunner", "--sites=resid_post,mlp_in,mlp_out", f"--output={workdir / 'activations'}"])
    return workdir


@pytest.mark.slow
def test_reading_it_back_runs_as_written(output_of_mlp_sites, monkeypatch):
    (code,) = [code for heading, code in blocks("python") if heading == "Reading it back"]
    monkeypatch.chdir(output_of_mlp_sites)  # the snippet reads "activations", relative
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    first = next(iter(namespace["layers"]))
    assert first.shape == (4096, 4, 64) or first.shape[1:] == (4, 64)
    assert namespace["acts"].shape[1] == 64 and len(namespace["ids"]) == len(namespace["acts"])


def test_the_model_api_runs_as_written():
    (code,) = [code for heading, code in blocks("python") if heading == "The model API"]
    assert '"/models/Qwen2.5-0.5B"' in code
    code = code.replace('"/models/Qwen2.5-0.5B"', '"tiny-random-qwen2"')
    input_ids = np.random.default_rng(0).integers(0, 1000, (2, 12))
    namespace = {"input_ids": input_ids}
    exec(compile(code, "README.md", "exec"), namespace)
    acts = namespace["acts"]
    assert acts["blocks.3.hook_resid_post"].shape == (2, 12, 64)
    assert np.isfinite(acts["blocks.3.hook_mlp_out"][1, :7]).all()


def beam_extract_commands() -> list[tuple[str, list[str]]]:
    """(heading, argv after the module) of every `python -m beam_extract ...` command in a bash block."""
    commands = []
    for heading, code in blocks("bash"):
        joined = code.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split(" #", 1)[0]
            match = re.search(r"python -m beam_extract(?:\s|$)(.*)", line)
            if match:
                commands.append((heading, shlex.split(match.group(1))))
    return commands


def test_the_readmes_commands_use_only_real_options():
    from beam_extract.options import check_arguments

    commands = beam_extract_commands()
    assert len(commands) >= 6
    for heading, argv in commands:
        check_arguments(argv)  # raises UsageError naming an unknown flag


def test_the_check_itself_refuses_a_misspelled_flag():
    from beam_extract.options import UsageError, check_arguments

    with pytest.raises(UsageError, match="output_dtype"):
        check_arguments(["--output_dytpe", "bfloat16"])
