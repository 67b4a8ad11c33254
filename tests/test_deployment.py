"""Launch anywhere: the Dockerfile, the Flex Template metadata, the documented commands, and the
self-managed worker-pool topology run locally."""

import json
import re
import shlex
from pathlib import Path

import pytest
from apache_beam.options.pipeline_options import PipelineOptions, PortableOptions, StandardOptions

from beam_extract.runners import WHOLE_RUN_S, is_local, spell_runner, watch_the_whole_run
from beam_extract.options import ExtractOptions, extract_options
from beam_extract.template import METADATA, render, template_metadata

ROOT = Path(__file__).parent.parent


def test_dockerfile_structure():
    text = (ROOT / "Dockerfile").read_text()
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    resolved = [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], f) for f in froms]
    assert resolved == [
        f"gcr.io/dataflow-templates-base/python311-template-launcher-base:{args['LAUNCHER_TAG']}",
        f"apache/beam_python3.11_sdk:{args['BEAM_VERSION']}",
    ]
    assert args["BEAM_VERSION"] == "2.77.0" and args["LAUNCHER_TAG"] not in ("latest", "")
    assert 'ENTRYPOINT ["/opt/apache/beam/boot"]' in text
    assert "COPY --from=launcher /opt/google/dataflow/python_template_launcher" in text
    py_file = re.search(r"^ENV FLEX_TEMPLATE_PYTHON_PY_FILE=(\S+)", text, re.M).group(1)
    assert py_file == "/template/beam_extract/__main__.py"
    assert "FLEX_TEMPLATE_PYTHON_REQUIREMENTS_FILE" not in text and "FLEX_TEMPLATE_PYTHON_SETUP_FILE" not in text
    assert re.search(r'pip install --no-cache-dir "\.\[tpu\]"', text)
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.M):
        *sources, _ = shlex.split(line)
        for source in sources:
            assert (ROOT / source).exists(), f"COPY source {source} is missing"


def test_metadata_is_generated_from_the_options():
    assert METADATA.read_text() == render(), "run python -m beam_extract.template"
    names = [p["name"] for p in template_metadata()["parameters"]]
    assert names == list(extract_options(PipelineOptions([])).as_dict()) and "model" in names and "resume" in names
    examples = {"output": "gs://bucket/out", "input": "gs://bucket/in/*.jsonl", "include_answer": "true",
                "resume": "true", "compilation_cache_dir": "gs://bucket/cache", "tokens_field": "input_ids"}
    for parameter in template_metadata()["parameters"]:
        name = parameter["name"]
        value = parameter.get("defaultValue") or examples[name]
        for regex in parameter.get("regexes", []):
            assert re.match(regex, value), (name, value, regex)
        parsed = getattr(PipelineOptions([f"--{name}={value}"]).view_as(ExtractOptions), name)
        assert parsed is (value == "true") if value in ("true", "false") else str(parsed) == value, (name, parsed)


def documented_launch_flags():
    """Every --flag of the python launch commands in the README's Dataflow and Streaming sections."""
    readme = (ROOT / "README.md").read_text()
    sections = [readme.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
                for title in ("Running on Dataflow", "Streaming")]
    blocks = [block for section in sections for block in re.findall(r"```bash\n(.*?)```", section, re.S)]
    commands = [c for block in blocks for c in block.replace("\\\n", " ").splitlines() if "beam_extract" in c]
    return [flag for c in commands for flag in re.findall(r"(--[a-z_]+)(?==|\s|$)", c)]


def test_documented_launch_flags_are_real_options():
    flags = documented_launch_flags()
    assert {"--runner", "--dataflow_service_options", "--worker_machine_type", "--experiments",
            "--sdk_container_image", "--number_of_worker_harness_threads", "--mesh", "--streaming",
            "--poll_interval", "--window_seconds", "--flush_seconds"} <= set(flags)
    dests = PipelineOptions([]).get_all_options()

    def known(flag):  # an unknown flag is kept under its own name; an alias sets its destination
        name = flag.lstrip("-")
        return name in dests or name not in PipelineOptions([f"{flag}=x"]).get_all_options(retain_unknown_options=True)

    assert not [f for f in flags if not known(f)]
    assert not known("--worker_machine_typo")  # the check itself can fail


@pytest.mark.slow
def test_extraction_through_a_local_worker_pool(tmp_path):
    from beam_extract.__main__ import main
    from beam_extract.format.commits import read_groups_on_disk
    from beam_extract.portable_local import local_worker_pool
    from beam_extract.readers.reader import read_records

    with local_worker_pool() as (runner_args, pool):
        main(runner_args + [f"--output={tmp_path / 'out'}", "--views_per_task=1", "--layers=1"])
        commits = read_groups_on_disk(str(tmp_path / "out"))
        assert commits and all(c["worker"]["parent_pid"] == pool.pid for c in commits)  # DoFns ran in the pool
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert manifest["counts"]["samples"] == 11 and manifest["counts"]["lines_unaccounted"] == 0
    records = list(read_records(str(tmp_path / "out/resid_post/layer_01/*.tfrecord")))
    assert len(records) == 11 and all(r["activations"].shape == (r["n_tokens"], 64) for r in records)


@pytest.mark.parametrize("args, local", [
    ([], True),
    (["--runner=PrismRunner"], True),
    (["--runner=PortableRunner", "--job_endpoint=localhost:8099"], True),
    (["--runner=FlinkRunner", "--environment_type=PROCESS"], True),  # an embedded Flink cluster
    (["--runner=FlinkRunner", "--flink_master=[local]", "--environment_type=EXTERNAL"], True),
    (["--runner=SparkRunner", "--environment_type=PROCESS"], True),  # local[4]
    (["--runner=FlinkRunner", "--flink_master=jobmanager:8081", "--environment_type=LOOPBACK"], True),
    (["--runner=FlinkRunner", "--flink_master=jobmanager:8081", "--environment_type=EXTERNAL"], False),
    (["--runner=SparkRunner", "--spark_master_url=spark://master:7077", "--environment_type=EXTERNAL"], False),
    (["--runner=PortableRunner", "--job_endpoint=tpu-vm:8099"], False),
    (["--runner=DataflowRunner"], False),
])
def test_a_job_ends_with_the_command_when_it_runs_here(args, local):
    """A local job is waited for (its lock released, its workers stopped with the command); a job
    on an embedded Flink or Spark cluster, or with its SDK workers in this process, is one."""
    assert is_local(PipelineOptions(args)) is local


@pytest.mark.parametrize("spelling, name", [("prism", "PrismRunner"), ("PRISMRUNNER", "PrismRunner"),
                                            ("direct", "DirectRunner"), ("flink", "FlinkRunner"),
                                            ("apache_beam.runners.portability.prism_runner.PrismRunner",
                                             "PrismRunner")])
def test_a_runner_is_known_by_any_spelling_beam_accepts(spelling, name):
    """Beam runs `--runner=prism` as Prism; every decision of ours (local or not, the prism binary
    installed here instead of a download) sees the name it lists, not a second spelling."""
    options = PipelineOptions([f"--runner={spelling}"])
    spell_runner(options)
    assert options.view_as(StandardOptions).runner == name
    assert is_local(options)  # Flink's default master is an embedded cluster


@pytest.mark.parametrize("args, deadline", [
    (["--runner=PrismRunner"], WHOLE_RUN_S),
    (["--runner=FlinkRunner", "--flink_master=[local]"], WHOLE_RUN_S),
    (["--runner=PrismRunner", "--job_server_timeout=42"], 42),
    (["--runner=PrismRunner", "--job-server-timeout", "42"], 42),
    (["--runner=PortableRunner", "--job_endpoint=localhost:8099"], 300),  # also bounds reaching that server
    (["--runner=DataflowRunner"], 300),  # not a portable job service: left as Beam has it
])
def test_a_portable_job_is_watched_as_long_as_it_runs(args, deadline):
    """Beam's wait for a portable job ends at --job_server_timeout (apache/beam#35867):
    tests/test_prism.py runs a job past it."""
    options = PipelineOptions(args)
    watch_the_whole_run(options, args)
    assert options.view_as(PortableOptions).job_server_timeout == deadline
