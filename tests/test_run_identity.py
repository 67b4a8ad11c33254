"""What a run is and where it goes, as the driver decides it: chat templates read the run's creation
date, never the clock; the fingerprint holds the software and device, and a resumption on others is
refused unless accepted; inspect's plots stay out of the output; a Flink or Spark job whose job
server lives in the launcher is waited for, and leaves no lock behind."""

import json
import shutil
import time

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from beam_extract.arc.augment import ArcView, augment
from beam_extract.model.weights import resolve_model_dir
from beam_extract.options import extract_options
from beam_extract.pipeline import run
from beam_extract.records.arc import ArcTask
from beam_extract.sink.ownership import LOCK, OutputRefused
from beam_extract.stages import TokenizeDoFn
from beam_extract.tokenize import Sample

# As Llama 3.x's templates do ("Today Date"), to the second: a prompt read from the clock would
# differ between any two renders a second apart.
CLOCK_TEMPLATE = (
    "{{- '<|im_start|>system\\nToday ' + strftime_now('%Y-%m-%d %H:%M:%S') + '<|im_end|>\\n' -}}"
    "{%- for message in messages -%}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' -}}"
    "{%- endfor -%}")
TASK = ArcTask("t", ((((1, 0), (0, 2)), ((2, 0), (0, 1))),), ((((0, 1), (1, 0)), None),), "in.jsonl", 1)


@pytest.fixture(scope="module")
def clock_model(tmp_path_factory):
    """The tiny Qwen2 checkpoint with a chat template that reads the clock."""
    directory = tmp_path_factory.mktemp("clock") / "model"
    shutil.copytree(resolve_model_dir("tiny-random-qwen2"), directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CLOCK_TEMPLATE}))
    return directory


def tokenized(model, created):
    options = extract_options(PipelineOptions([f"--model={model}", "--input_format=arc"]))
    tokenize = TokenizeDoFn(options, 1 << 20, None, created)
    tokenize.setup()
    [result] = [getattr(r, "value", r) for r in tokenize.process(ArcView(*augment(TASK, 0, 0)))]
    return tokenize, result


def test_a_chat_template_reads_the_runs_date_not_the_clock(clock_model):
    tokenize, sample = tokenized(clock_model, "2020-01-02T03:04:05+00:00")
    assert isinstance(sample, Sample)
    assert "Today 2020-01-02 03:04:05" in tokenize._tokenizer.decode(sample.token_ids)
    _, without_date = tokenized(clock_model, None)  # no date given: a dead letter, never the clock
    assert without_date.reason == "tokenizer_error" and "no run date was given" in without_date.detail


@pytest.fixture(scope="module")
def finished_run(clock_model, tmp_path_factory):
    """A run of the clock model over the packaged ARC sample, one view, one layer."""
    output = tmp_path_factory.mktemp("run") / "out"
    args = [f"--model={clock_model}", f"--output={output}", "--input_format=arc", "--views_per_task=1",
            "--layers=0", "--max_seq_len=2048", "--runner=DirectRunner"]
    from beam_extract.options import sample_input

    args.append("--input=" + sample_input().replace("sample_*", "sample_arc"))
    run(args)
    return output, args


@pytest.mark.slow
def test_a_resumption_another_second_keeps_the_prompts_and_refuses_other_software(finished_run, tmp_path):
    """The issue's case: a resume at another time found every sample changed_since_commit. And a
    resume with other software is refused by name, unless --accept_software_change (in the manifest)."""
    first, args = finished_run
    output = tmp_path / "out"
    shutil.copytree(first, output)
    args = [a if not a.startswith("--output=") else f"--output={output}" for a in args]
    recorded = json.loads((output / "_run/fingerprint.json").read_text())
    assert set(recorded["software"]) == {"beam-extract", "jax", "jaxlib", "transformers", "tokenizers"}
    assert recorded["device"]["platform"] in ("cpu", "gpu", "tpu") and recorded["created"]
    before = json.loads((output / "manifest.json").read_text())
    time.sleep(1.1)  # %H:%M:%S of a later render differs
    recorded["software"]["jax"] = "0.0.1"
    (output / "_run/fingerprint.json").write_text(json.dumps(recorded))
    with pytest.raises(OutputRefused, match=r'software.jax: "0.0.1" -> .*--accept_software_change'):
        run([*args, "--resume"])
    run([*args, "--resume", "--accept_software_change"])
    after = json.loads((output / "manifest.json").read_text())
    assert after["ok"] and after["counts"]["samples_resumed"] == before["counts"]["samples"] > 0
    assert "changed_since_commit" not in after["counts"]["dead_letters"]
    assert after["software"]["accepted_changes"] == [f'software.jax: "0.0.1" -> "{after["software"]["jax"]}"']
    assert json.loads((output / "_run/fingerprint.json").read_text())["created"] == recorded["created"]


@pytest.mark.slow
def test_inspect_writes_plots_where_asked_and_nothing_into_the_output(finished_run, tmp_path, monkeypatch, capsys):
    from beam_extract.inspect import main

    output, _ = finished_run
    files = sorted(p for p in output.rglob("*"))
    monkeypatch.chdir(tmp_path)
    main([str(output)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inspect_norms.png", "inspect_tokens.png"]
    main([str(output), f"--plots={tmp_path}/plots"])
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["inspect_norms.png", "inspect_tokens.png"]
    capsys.readouterr()
    for argv, message in [([str(output), f"--plots={output}/plots"], "is inside the output"),
                          ([str(tmp_path / "nowhere")], "holds no manifest.json"),
                          ([str(output / "_run")], "holds no manifest.json")]:
        with pytest.raises(SystemExit) as exited:
            main(argv)
        said = capsys.readouterr().err.strip().splitlines()
        assert exited.value.code == 2 and len(said) == 1 and message in said[0], said
    assert sorted(p for p in output.rglob("*")) == files


@pytest.mark.parametrize("args, elsewhere", [
    (["--runner=FlinkRunner", "--flink_master=host:8081"], False),  # its job server is this process's child
    (["--runner=FlinkRunner", "--flink_master=[local]"], False),
    (["--runner=FlinkRunner", "--flink_master=host:8081", "--flink_submit_uber_jar"], True),
    (["--runner=FlinkRunner", "--flink_master=host:8081", "--job_endpoint=host:8099"], True),
    (["--runner=SparkRunner", "--spark_master_url=spark://host:7077"], False),
    (["--runner=SparkRunner", "--spark_master_url=spark://host:7077", "--spark_submit_uber_jar",
      "--spark_rest_url=http://host:6066"], True),
    (["--runner=DataflowRunner"], True),
    (["--runner=PortableRunner", "--job_endpoint=tpu-vm:8099"], True),
    (["--runner=DirectRunner"], False),
])
def test_who_waits_for_the_job(args, elsewhere):
    from beam_extract.runners import runs_elsewhere

    assert runs_elsewhere(PipelineOptions(args)) is elsewhere


class _Submitted:
    """What Beam's portable runner returns once the job server has the job."""

    waited = False
    state = "RUNNING"

    def wait_until_finish(self):
        _Submitted.waited = True
        return "DONE"


@pytest.mark.parametrize("outcome", ["submitted", "job server failed"])
def test_a_flink_cluster_job_is_waited_for_and_never_leaves_a_lock(tmp_path, monkeypatch, outcome):
    """Beam's FlinkRunner (no uber jar) runs its job server as this process's child: returning at
    submission would kill it before Flink got the job and leave the output locked."""
    def pipeline_run(self, *args, **kwargs):
        if outcome != "submitted":
            raise RuntimeError("the job server exited")
        return _Submitted()

    monkeypatch.setattr(beam.Pipeline, "run", pipeline_run)
    _Submitted.waited = False
    argv = ["--runner=FlinkRunner", "--flink_master=host:8081", f"--output={tmp_path}/out", "--layers=0"]
    if outcome == "submitted":
        result, job = run(argv)
        assert _Submitted.waited and not job.remote
    else:
        with pytest.raises(RuntimeError, match="the job server exited"):
            run(argv)
    assert not (tmp_path / "out" / LOCK).exists()
