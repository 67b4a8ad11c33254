"""Nothing lost, nothing twice, nothing mixed: ids that cannot collide, a fingerprint that --resume
must match, one job per output, no foreign file touched, retried bundles counted once, and a
summary that says ok only when the invariants were checked."""

import gzip
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from pathlib import Path

from beam_extract.records.identity import input_root, relative_name
from test_pipeline_default_run import GUARDED_MAIN, TESTS, run_guarded

GRID = [[1, 0], [0, 2]]
SMALL = ["--runner=DirectRunner", "--layers=0,2", "--sites=resid_post,mlp_out", "--views_per_task=2",
         "--max_seq_len=512"]


def task(task_id=None, **changes):
    body = {"train": [{"input": GRID, "output": GRID}], "test": [{"input": GRID}], **changes}
    return json.dumps({"task_id": task_id, **body} if task_id is not None else body)


def write_lines(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as handle:
        handle.write("".join(line + "\n" for line in lines))


def cli(tmp_path, *args):
    return run_guarded([*SMALL, *args], tmp_path, tmp_path / "connections.log")


def manifest(path):
    return json.loads((path / "manifest.json").read_text())


def records(output):
    """(hook, sample id) -> record, through the reader; fails on a record read twice."""
    from beam_extract.readers.reader import read_activations

    found = {}
    for hook in manifest(output)["hooks"]:
        for record in read_activations(str(output), hook):
            key = (hook, record["sample_id"])
            assert key not in found, f"{key} read twice"
            found[key] = record
    return found


def files_on_disk(output):
    return sorted(p.relative_to(output).as_posix() for p in output.rglob("*") if p.is_file())


# -- identity -------------------------------------------------------------------------------------

def test_file_names_do_not_depend_on_how_the_input_is_spelled():
    spellings = ["data/*.jsonl", "/home/me/data/*.jsonl", "data/a.jsonl", "gs://bucket/data/*.jsonl",
                 "/home/me/data/a.json[l]", "gs://bucket/data/a.jsonl"]
    prefixes = {"data/*.jsonl": "data", "data/a.jsonl": "data", "/home/me/data/*.jsonl": "/home/me/data",
                "/home/me/data/a.json[l]": "/home/me/data", "gs://bucket/data/*.jsonl": "gs://bucket/data",
                "gs://bucket/data/a.jsonl": "gs://bucket/data"}
    for spelling in spellings:
        root = input_root(spelling)
        assert root == prefixes[spelling]
        assert relative_name(f"{root}/a.jsonl", root) == "a.jsonl"
    assert input_root("data/**/x.jsonl") == "data" and relative_name("data/sub/x.jsonl", "data") == "sub/x.jsonl"
    assert relative_name("/elsewhere/a.jsonl", "data") == "/elsewhere/a.jsonl"


@pytest.mark.slow
@pytest.mark.parametrize("batching", [[], ["--packing=off", "--batch_size=1"]], ids=["packed", "one-per-batch"])
def test_colliding_document_and_task_ids_are_all_written_once(tmp_path, batching):
    """Two files with the same document ids 0..2 (and a document without an id in each), and ARC
    task ids that the old commit hash confused ("a" and "a/v0/t0\\nb"): every line gets its samples."""
    for name in ("one", "two"):
        write_lines(tmp_path / "in" / f"{name}.jsonl",
                    [json.dumps({"id": i, "text": f"{name} document {i} about rivers"}) for i in range(3)]
                    + [json.dumps({"text": f"{name} document without an id"})])
    write_lines(tmp_path / "in" / "tasks.jsonl", [task("a"), task("a/v0/t0\nb"), task()])
    result = cli(tmp_path, "--input=in/*.jsonl", "--output=out", *batching)
    assert result.returncode == 0, result.stderr[-3000:]
    found = records(tmp_path / "out")
    ids = {sample for _, sample in found}
    assert len(ids) == 8 + 3 * 2  # 8 documents, 3 tasks x 2 views
    assert {"one.jsonl:1#w0", "two.jsonl:1#w0", "one.jsonl:4#w0", "tasks.jsonl:3/v1/t0", "a/v0/t0",
            "a/v0/t0\nb/v0/t0"} <= ids
    assert {r["doc_id"] for (_, s), r in found.items() if s.startswith("two.jsonl:")} == {"0", "1", "2", ""}
    counts = manifest(tmp_path / "out")["counts"]
    assert counts["samples"] == counts["samples_committed"] == 14 and counts["samples_committed_twice"] == 0
    assert "each once: ok" in result.stdout


# -- resume ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run over text and ARC input, to resume with other settings."""
    directory = tmp_path_factory.mktemp("finished")
    write_lines(directory / "in" / "docs.jsonl", [json.dumps({"text": f"document {i} " * 20}) for i in range(6)])
    write_lines(directory / "in" / "tasks.jsonl", [task("t1"), task("t2")])
    result = cli(directory, "--input=in/*.jsonl", "--output=out")
    assert result.returncode == 0, result.stderr[-3000:]
    return directory


@pytest.mark.slow
@pytest.mark.parametrize("changed, named", [
    (["--layers=1,2"], "hooks"),
    (["--output_dtype=bfloat16"], "output_dtype"),
    (["--dtype=bfloat16"], "dtype"),
    (["--seed=3"], "seed"),
    (["--max_seq_len=256"], "max_seq_len"),
    (["--norm_exclude_first=0"], "norm_exclude_first"),
    (["--model=other-weights"], "weights_sha256"),
])
def test_resume_with_other_settings_is_refused_before_any_work(finished, changed, named):
    if changed == ["--model=other-weights"]:
        from safetensors.numpy import load_file, save_file

        from beam_extract.model.weights import resolve_model_dir

        other = finished / "other-weights"
        if not other.exists():
            shutil.copytree(resolve_model_dir("tiny-random-qwen2"), other)
            tensors = load_file(other / "model.safetensors")
            name = next(n for n in sorted(tensors) if n.endswith("mlp.up_proj.weight"))
            tensors[name] = tensors[name] * np.float32(1.01)
            save_file(tensors, other / "model.safetensors")
    before = files_on_disk(finished / "out")
    result = cli(finished, "--input=in/*.jsonl", "--output=out", "--resume", *changed)
    assert result.returncode == 2, result.stderr[-3000:]
    message = result.stderr.strip().splitlines()
    assert len(message) == 1 and "--resume refused" in message[0] and f"{named}:" in message[0]
    assert "Traceback" not in result.stderr
    assert files_on_disk(finished / "out") == before  # nothing written, nothing deleted


@pytest.mark.slow
def test_resume_with_the_input_spelled_otherwise_writes_nothing_again(finished):
    before = manifest(finished / "out")
    for spelling in (f"--input={finished}/in/*.jsonl", f"--input={finished}/in/docs.jsonl"):
        result = cli(finished, spelling, "--output=out", "--resume")
        counts = manifest(finished / "out")["counts"]
        if spelling.endswith("docs.jsonl"):  # only one of the two files: the other's samples would be of no input
            assert result.returncode == 2 and "are not matched now (tasks.jsonl)" in result.stderr
            continue
        assert result.returncode == 0, result.stderr[-3000:]
        assert counts["samples_extracted_now"] == 0 and counts["samples_resumed"] == before["counts"]["samples"]
    assert manifest(finished / "out")["hooks"].keys() == before["hooks"].keys()


@pytest.mark.slow
def test_plain_rerun_is_refused_and_resume_of_a_finished_run_is_a_no_op(finished):
    result = cli(finished, "--input=in/*.jsonl", "--output=out")
    assert result.returncode == 2 and "--resume" in result.stderr and "Traceback" not in result.stderr


# -- ownership ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_second_job_on_the_same_output_is_refused_while_the_first_runs(tmp_path):
    write_lines(tmp_path / "in" / "docs.jsonl", [json.dumps({"text": "word " * 400}) for _ in range(40)])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    first = subprocess.Popen([sys.executable, "-c", GUARDED_MAIN, str(tmp_path / "log"), *SMALL, "--input=in/*.jsonl",
                              "--output=out"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    lock = tmp_path / "out/_run/lock.json"
    deadline = time.monotonic() + 120
    while not lock.exists():
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)  # holding the lock for as long as the second job needs to start
    try:
        holder = json.loads(lock.read_text())
        second = cli(tmp_path, "--input=in/*.jsonl", "--output=out", "--resume")
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2 and "in use by" in second.stderr and str(holder["pid"]) in second.stderr
    assert first.wait(timeout=600) == 0, first.stderr.read()[-3000:]
    assert not lock.exists()  # released when the job ended
    assert manifest(tmp_path / "out")["ok"]


def test_a_stale_lock_is_taken_over_and_a_live_one_is_not(tmp_path):
    from beam_extract.lifetime import machine_id
    from beam_extract.sink.ownership import OutputRefused, release_lock, take_lock

    output = str(tmp_path / "out")
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "out/_run").mkdir(parents=True)
    (tmp_path / "out/_run/lock.json").write_text(json.dumps({"run_id": "killed", "host": machine_id(),
                                                             "pid": dead.pid, "pid_start": "1", "remote": False}))
    held = take_lock(output, "mine", "local", False)  # the holder is gone: stale
    assert held["run_id"] == "mine"
    with pytest.raises(OutputRefused, match="in use by run mine"):
        take_lock(output, "another", "local", False)  # this process is alive
    assert release_lock(output, held) and not (tmp_path / "out/_run/lock.json").exists()
    (tmp_path / "out/_run/lock.json").write_text(json.dumps({"run_id": "far", "host": "another-host", "pid": 1}))
    with pytest.raises(OutputRefused, match="on another-host"):
        take_lock(output, "mine", "local", False)  # another host's lock is never broken


def test_the_lock_on_gcs_is_created_only_if_absent(gcs_with_preconditions):
    from beam_extract.sink.ownership import OutputRefused, release_lock, take_lock

    output = f"{gcs_with_preconditions}/out"
    held = take_lock(output, "first", "remote", True)
    with pytest.raises(OutputRefused, match="in use by run first"):
        take_lock(output, "second", "remote", True)
    assert release_lock(output, held)
    assert take_lock(output, "second", "remote", True)["run_id"] == "second"


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["foreign", "old"])
def test_a_directory_we_did_not_write_is_refused_with_nothing_deleted(tmp_path, layout):
    out = tmp_path / "out"
    if layout == "foreign":
        (out / "resid_post/layer_00").mkdir(parents=True)
        (out / "resid_post/layer_00/mine.tfrecord").write_bytes(b"a user's own file")
        (out / "notes.txt").write_text("keep me")
    else:  # the first round's layout: commits but no fingerprint
        (out / "_committed").mkdir(parents=True)
        (out / "_committed/abc.json").write_text("{}")
        (out / "resid_post/layer_00").mkdir(parents=True)
        (out / "resid_post/layer_00/part-abc-000.tfrecord").write_bytes(b"old")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for extra in ([], ["--resume"]):
        result = cli(tmp_path, "--output=out", *extra)
        assert result.returncode == 2 and "no beam-extract run" in result.stderr and "Traceback" not in result.stderr
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


# -- retries --------------------------------------------------------------------------------------

def extracted(samples, hooks=2, tokens=5):
    """An ExtractedBatch of these sample ids, a row each."""
    from beam_extract.sink.extracted import StoredSample, extracted_batch
    from beam_extract.tokenize import Sample

    stored = [StoredSample(Sample(s, np.arange(1, tokens + 1, dtype=np.int32), "in.jsonl", n + 1), n,
                           slice(0, tokens), "digest") for n, s in enumerate(samples)]
    rows = len(samples)
    return extracted_batch(stored, np.tile(np.arange(tokens), (rows, 1)),
                           tuple(np.full((rows, tokens, 2), h, np.float32) for h in range(hooks)),
                           tuple(np.ones((rows, tokens), np.float32) for _ in range(hooks)), "float32")


def test_a_retried_bundle_with_other_batches_is_committed_once(tmp_path):
    """What a runner does when a bundle fails after its writes: the attempt's groups are on disk but
    never passed on; the retry batches the same samples differently. Readers see each sample once,
    before the end (from the disk, killed run) and after it (from what the pipeline passed on)."""
    from apache_beam.transforms.window import GlobalWindow

    from beam_extract.format.commits import read_groups_on_disk
    from beam_extract.format.schema import decode_record
    from beam_extract.format.tfrecord import iter_tfrecord
    from beam_extract.readers.reader import hook_files
    from beam_extract.sink.writer import WriteShards, remove_unlisted

    output, hooks = str(tmp_path), ((0, "resid_post"), (1, "resid_post"))
    samples = [f"s{i}" for i in range(6)]

    def attempt(batches):
        writer = WriteShards(output, hooks, shard_bytes=1 << 20)
        writer.setup()
        writer.start_bundle()
        groups = [g for b in batches for g in writer.process(extracted(b), window=GlobalWindow())]
        groups += [wv.value for wv in writer.finish_bundle()]
        writer.teardown()
        return groups

    failed = attempt([samples[:4], samples[4:]])
    retried = attempt([samples[:1], samples[1:3], samples[3:]])
    assert {g["group"] for g in failed}.isdisjoint(g["group"] for g in retried)  # never the same identity
    assert len(read_groups_on_disk(output)) == 2

    def ids_read():
        return sorted(decode_record(data)["sample_id"] for f in hook_files(output, "blocks.0.hook_resid_post")
                      for data in iter_tfrecord(f))

    assert ids_read() == samples  # a killed run read back: the overlapping group is left out
    remove_unlisted(output, hooks, retried)  # the end of the run: only what was passed on stays
    assert [g["group"] for g in read_groups_on_disk(output)] == [g["group"] for g in retried]
    assert ids_read() == samples and len(list(tmp_path.rglob("*.tfrecord"))) == 2


def test_invariants_are_checked_not_assumed():
    from beam_extract.accounting.invariants import problems

    good = {"lines_unaccounted": 0, "samples_extracted_now": 5, "samples_committed_now": 5,
            "samples_committed_twice": 0, "samples_committed": 5, "samples": 5}
    assert problems(good, {}) == []
    assert problems({**good, "samples_committed_now": 4, "samples_committed": 4}, {}) == [
        "5 samples extracted but 4 committed by this run", "4 samples committed for 5 produced from this input "
        "(the resumed run committed samples of other input)"]
    assert problems({**good, "samples_committed_twice": 1}, {}) == ["1 samples committed more than once"]
    assert problems(good, {"truncated_file": 1, "not_a_file": 2}) == [
        "1 input files were not read to their end (see the read dead letters)"]
    nothing = {**good, "samples_extracted_now": 0, "samples_committed_now": 0, "samples_committed": 0, "samples": 0}
    assert problems(nothing, {"invalid_json": 3}) == ["no sample was written"]
    # A sample that does not fit the device is a dead letter, not a loss.
    assert problems({**good, "samples_committed_now": 4, "samples_committed": 4}, {"model_oom": 1}) == []
    # Resumed: 4 samples skipped or extracted, 1 committed before whose line changed since.
    resumed = {**good, "samples": 4, "samples_extracted_now": 0, "samples_committed_now": 0}
    assert problems(resumed, {"changed_since_commit": 1}) == [
        "1 samples committed by the run resumed no longer match their input (changed_since_commit dead letters)"]
    window = {**good, "samples_committed": 0}
    assert problems(window, {}, whole_run=False) == []


# -- input files and hostile values, end to end ----------------------------------------------------

@pytest.mark.slow
def test_a_cut_gz_and_a_surrogate_id_are_dead_letters_and_the_summary_is_not_ok(tmp_path):
    lines = [json.dumps({"id": i, "text": f"line {i} of a long file " * 5}) for i in range(400)]
    write_lines(tmp_path / "in" / "whole.jsonl.gz", lines)
    data = gzip.compress("".join(line + "\n" for line in lines).encode())
    (tmp_path / "in" / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    write_lines(tmp_path / "in" / "odd.jsonl", ['{"id": "\\udc00", "text": "a lone surrogate in the id"}',
                                                json.dumps({"text": "fine"})])
    (tmp_path / "in" / "subdir.jsonl").mkdir()
    os.mkfifo(tmp_path / "in" / "pipe.jsonl")
    result = cli(tmp_path, "--input=in/*.jsonl*", "--output=out", "--layers=0", "--sites=resid_post")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "input files were not read to their end" in result.stdout and "NOT OK" in result.stdout
    found = manifest(tmp_path / "out")
    assert found["ok"] is False and found["counts"]["dead_letters"]["truncated_file"] == 1
    assert found["counts"]["dead_letters"]["invalid_unicode"] == 1
    assert found["counts"]["dead_letters"]["not_a_file"] == 1  # the FIFO (a glob lists no directory)
    assert found["counts"]["lines_unaccounted"] == 0
    written = {s for _, s in records(tmp_path / "out")}
    cut = {s for s in written if s.startswith("cut.jsonl.gz:")}
    assert 0 < len(cut) < 400 and len({s for s in written if s.startswith("whole.jsonl.gz:")}) == 400
    # The same input resumed: nothing crashes on the same line, nothing is written twice.
    again = cli(tmp_path, "--input=in/*.jsonl*", "--output=out", "--layers=0", "--sites=resid_post", "--resume")
    assert again.returncode == 1 and manifest(tmp_path / "out")["counts"]["samples_extracted_now"] == 0


# -- scale ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_files_grow_with_bytes_not_with_batches(tmp_path):
    rng = np.random.default_rng(0)
    words = "river valley stone water flood sea hill sand wind rain".split()
    write_lines(tmp_path / "in" / "docs.jsonl", [json.dumps({"text": " ".join(rng.choice(words, 300))})
                                                 for _ in range(120)])
    result = cli(tmp_path, "--input=in/*.jsonl", "--output=out", "--packing=off", "--batch_size=1",
                 "--shard_size_mb=1", "--layers=0", "--sites=resid_post")
    assert result.returncode == 0, result.stderr[-3000:]
    found = manifest(tmp_path / "out")
    assert found["batching"]["batches"] == 120
    part = found["hooks"]["blocks.0.hook_resid_post"]
    hook_bytes = sum((tmp_path / "out" / f).stat().st_size for f in part["files"])
    assert hook_bytes > 2 << 20  # several shards' worth
    bundles = 2  # the writer's bundles on this runner: files closed early by a bundle's end
    assert len(part["files"]) <= math.ceil(hook_bytes / (1 << 20)) + bundles
    assert found["commits"] == len(part["files"]) == len(list((tmp_path / "out/_committed").glob("*.json")))


# -- kill -9 of a multi-process job ---------------------------------------------------------------

@pytest.mark.slow
def test_killed_multi_process_job_stops_its_workers_and_resumes_at_once(tmp_path):
    write_lines(tmp_path / "in" / "docs.jsonl", [json.dumps({"text": f"document {i} " + "word " * 300})
                                                 for i in range(60)])
    args = [*SMALL, "--input=in/*.jsonl", "--output=out", "--packing=off", "--batch_size=1", "--shard_size_mb=1",
            "--direct_num_workers=2", "--direct_running_mode=multi_processing"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    victim = subprocess.Popen([sys.executable, "-c", GUARDED_MAIN, str(tmp_path / "log"), *args], cwd=tmp_path,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parts = tmp_path / "out/resid_post/layer_00"
    deadline = time.monotonic() + 300
    while not (parts.exists() and any(parts.glob("part-*.tfrecord"))):
        assert victim.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    def children(pid):
        return subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()

    workers = [pid for shell in children(victim.pid) for pid in [shell, *children(shell)]]  # sh -c python ...
    assert workers, "the job runs its workers in child processes"
    victim.send_signal(signal.SIGKILL)
    victim.wait()

    def alive():
        return [pid for pid in workers if os.path.exists(f"/proc/{pid}")
                and "Z" not in open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()[0]]

    time.sleep(0.5)
    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")}
    deadline = time.monotonic() + 10
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(), f"workers {alive()} outlived their driver by 10 s"
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")} == written  # nothing written since
    resumed = cli(tmp_path, *args[len(SMALL):], "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    counts = manifest(tmp_path / "out")["counts"]
    assert counts["samples"] == counts["samples_committed"] == 60 and counts["samples_committed_twice"] == 0
    assert len({s for _, s in records(tmp_path / "out")}) == 60


def test_jobs_breaking_the_same_stale_lock_at_once_leave_one_holder(tmp_path):
    import threading

    from beam_extract.lifetime import machine_id
    from beam_extract.sink.ownership import OutputRefused, take_lock

    for attempt in range(20):
        output = str(tmp_path / f"out{attempt}")
        os.makedirs(f"{output}/_run")
        with open(f"{output}/_run/lock.json", "w") as handle:
            json.dump({"run_id": "killed", "host": machine_id(), "pid": 999_999_999, "pid_start": "1"}, handle)
        start, held, refused = threading.Barrier(8), [], []

        def job(name):
            start.wait()
            try:
                held.append(take_lock(output, name, "local", False)["run_id"])
            except OutputRefused:
                refused.append(name)

        threads = [threading.Thread(target=job, args=(f"job{i}",)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(held) == 1 and len(refused) == 7
        assert json.load(open(f"{output}/_run/lock.json"))["run_id"] == held[0]


@pytest.mark.slow
def test_resume_over_changed_moved_or_missing_input_is_refused(tmp_path):
    write_lines(tmp_path / "in" / "a.jsonl", [json.dumps({"text": f"first text {i}"}) for i in range(4)])
    write_lines(tmp_path / "in" / "b.jsonl", [json.dumps({"text": f"second text {i}"}) for i in range(4)])
    result = cli(tmp_path, "--input=in/*.jsonl", "--output=out", "--layers=0")
    assert result.returncode == 0, result.stderr[-3000:]
    before = files_on_disk(tmp_path / "out")
    shutil.copytree(tmp_path / "in", tmp_path / "moved" / "in")
    refusals = {
        # the input root moves: every {file}:{line} id would name other documents
        "no input file is named as in the run resumed": "--input=moved/*/*.jsonl",
        "are not matched now": "--input=in/a.jsonl",  # b.jsonl's committed samples would be of no input
    }
    for message, spelling in refusals.items():
        refused = cli(tmp_path, spelling, "--output=out", "--layers=0", "--resume")
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr[-2000:]
    write_lines(tmp_path / "in" / "a.jsonl", [json.dumps({"text": f"other text {i}"}) for i in range(4)])
    refused = cli(tmp_path, "--input=in/*.jsonl", "--output=out", "--layers=0", "--resume")
    assert refused.returncode == 2 and "a.jsonl changed" in refused.stderr
    assert files_on_disk(tmp_path / "out") == before
    # The same input under another spelling, plus a new file: only the new file's samples are extracted.
    write_lines(tmp_path / "in" / "a.jsonl", [json.dumps({"text": f"first text {i}"}) for i in range(4)])
    write_lines(tmp_path / "in" / "c.jsonl", [json.dumps({"text": f"third text {i}"}) for i in range(4)])
    (tmp_path / "out/dead_letter/README.txt").write_text("a note of the user's, among the dead letters")
    again = cli(tmp_path, f"--input={tmp_path}/in/*.jsonl", "--output=out", "--layers=0", "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "out/dead_letter/README.txt").exists()  # cleanup removes only dead-letter files of ours
    counts = manifest(tmp_path / "out")["counts"]
    assert counts["samples_resumed"] == 8 and counts["samples_extracted_now"] == 4 and counts["samples_committed"] == 12


@pytest.mark.parametrize("streaming", [False, True], ids=["join", "lookup"])
def test_a_committed_sample_whose_tokens_changed_is_a_dead_letter_not_a_skip(tmp_path, streaming):
    """The safety net under the input check: same id, other tokens (e.g. an ARC task id now first
    used by a new file) is never skipped as done; batch jobs decide on a join by sample id,
    streaming jobs on a lookup."""
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    from beam_extract.records.dead_letter import DEAD_LETTER
    from beam_extract.resume import RESUMED, SkipCommitted
    from beam_extract.sink.commits import write_sample_ids
    from beam_extract.tokenize import Sample, sample_digest

    same = Sample("t/v0/t0", np.arange(5, dtype=np.int32), "a.jsonl", 1)
    other = Sample("t/v1/t0", np.arange(6, dtype=np.int32), "a.jsonl", 1)
    new = Sample("u/v0/t0", np.arange(3, dtype=np.int32), "b.jsonl", 1)
    path = str(tmp_path / "0123456789ab.skip.jsonl")
    write_sample_ids(path, [(same.sample_id, sample_digest(same)), (other.sample_id, "0" * 16),
                            ("gone/v0/t0", "1" * 16)])  # committed, not in the input now: nothing to route
    with TestPipeline() as pipeline:
        out = pipeline | beam.Create([same, other, new]) | SkipCommitted(path, streaming)
        assert_that(out.todo | "TodoIds" >> beam.Map(lambda s: s.sample_id), equal_to([new.sample_id]), "todo")
        assert_that(out[RESUMED] | "ResumedIds" >> beam.Map(lambda s: s.sample_id), equal_to([same.sample_id]),
                    "resumed")
        assert_that(out[DEAD_LETTER] | beam.Map(lambda d: (d.record_id, d.reason)),
                    equal_to([(other.sample_id, "changed_since_commit")]), "dead")


def test_resume_joins_committed_ids_instead_of_loading_them_in_every_worker(tmp_path):
    """A batch job's skip is a CoGroupByKey of the samples with the skip file read as text (split
    in byte ranges): no DoFn loads the committed ids whole."""
    import apache_beam as beam

    from beam_extract import resume
    from beam_extract.sink.commits import write_sample_ids

    path = str(tmp_path / "0123456789ab.skip.jsonl")
    write_sample_ids(path, [("a/v0/t0", "0" * 16)])
    pipeline = beam.Pipeline()
    _ = pipeline | beam.Create([]) | resume.SkipCommitted(path)
    labels = [t.full_label for t in pipeline.transforms_stack[0].parts[-1].parts]
    assert any("JoinCommitted" in label for label in labels) and any("ReadCommitted" in label for label in labels)
    assert not any(isinstance(getattr(t.transform, "dofn", None), resume._LookupCommitted)
                   for t in pipeline.transforms_stack[0].parts[-1].parts)


@pytest.mark.slow
def test_odd_outputs_are_refused_in_one_line_and_left_as_they_were(tmp_path):
    (tmp_path / "afile").write_text("a file")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs/notes.txt").write_text("keep")
    for output, message in (("out[1]", "glob characters"), ("afile", "is a file"), ("theirs", "no beam-extract run")):
        result = cli(tmp_path, f"--output={output}")
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out[1]").exists() and (tmp_path / "afile").read_text() == "a file"
    assert sorted(p.name for p in (tmp_path / "theirs").iterdir()) == ["notes.txt"]  # no _run/ left behind


@pytest.mark.slow
def test_overwrite_and_cleanup_touch_only_files_named_as_ours(tmp_path):
    """A user's files inside our own folders, named like ours but not ours, survive --overwrite and
    --resume; an output with a symbolic link in it is refused before anything is deleted."""
    first = cli(tmp_path, "--output=out", "--layers=0")
    assert first.returncode == 0, first.stderr[-3000:]
    planted = [tmp_path / "out/resid_post/layer_00/part-precious.tfrecord", tmp_path / "out/_committed/notes.json",
               tmp_path / "out/dead_letter/parse-mine.jsonl", tmp_path / "out/resid_post/layer_07/part-x.tfrecord"]
    for path in planted:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("the user's")
    for extra in (["--resume"], ["--overwrite", "--sites=mlp_out"]):
        result = cli(tmp_path, "--output=out", "--layers=0", *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        assert all(path.read_text() == "the user's" for path in planted)
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim/part-0123456789ab-0123456789ab.tfrecord").write_text("elsewhere")
    shutil.rmtree(tmp_path / "out/resid_post/layer_07")
    (tmp_path / "out/resid_post/layer_07").symlink_to(tmp_path / "victim")
    refused = cli(tmp_path, "--output=out", "--layers=0", "--overwrite")
    assert refused.returncode == 2 and "symbolic link" in refused.stderr
    assert (tmp_path / "victim/part-0123456789ab-0123456789ab.tfrecord").read_text() == "elsewhere"


@pytest.mark.parametrize("given", [pytest.param("a directory", marks=pytest.mark.slow), "default",
                                   pytest.param("none", marks=pytest.mark.slow)])
def test_a_second_job_loads_its_forwards_from_the_compilation_cache(tmp_path, monkeypatch, given):
    """On by default (issue 26, item 17): a repeated worker start on this machine loads its forwards
    from $BEAM_EXTRACT_CACHE/compile-cache instead of compiling them; `none` turns it off."""
    from beam_extract.model.compile_cache import default_directory

    monkeypatch.setenv("BEAM_EXTRACT_CACHE", str(tmp_path / "home-cache"))
    write_lines(tmp_path / "in.jsonl", [task("t1"), task("t2", train=[{"input": GRID, "output": GRID}] * 3)])
    cache = {"a directory": tmp_path / "cache", "default": Path(default_directory()), "none": None}[given]
    assert given != "default" or cache.is_relative_to(tmp_path / "home-cache/compile-cache")
    flag = {"a directory": [f"--compilation_cache_dir={cache}"], "default": [],
            "none": ["--compilation_cache_dir=none"]}[given]
    runs = []
    for name in ("first", "second"):
        result = cli(tmp_path, f"--input={tmp_path / 'in.jsonl'}", f"--output={tmp_path / name}", *flag)
        assert result.returncode == 0, result.stderr[-2000:]
        runs.append(manifest(tmp_path / name)["batching"])
    first, second = runs
    assert first["compilations"] == second["compilations"] == len(first["batch_shapes"]) > 0
    assert first["compile_cache_hits"] == 0
    assert second["compile_cache_hits"] == (0 if cache is None else second["compilations"])
    assert cache is None or any(cache.iterdir())
    assert not (tmp_path / "home-cache/compile-cache").exists() or given == "default"
    records_first, records_second = records(tmp_path / "first"), records(tmp_path / "second")
    assert records_first.keys() == records_second.keys()
    for key, record in records_first.items():
        assert record["activations"].tobytes() == records_second[key]["activations"].tobytes(), key


@pytest.mark.parametrize("where", ["local", "gs"])
def test_resume_and_overwrite_remove_beams_temporary_dead_letter_directories(tmp_path, where, request):
    """A failed attempt leaves WriteToText's dead_letter/beam-temp-*/ (batch) and fileio's
    dead_letter/.temp*/ (streaming) directories with files in them: cleanup removes them whole, and
    nothing else of the user's there."""
    from apache_beam.io.filesystems import FileSystems
    from beam_extract.format.storage import list_paths
    from beam_extract.job import DEAD_LETTER_STAGES
    from beam_extract.sink import ownership

    output = f"{request.getfixturevalue('gcs_bucket')}/temp-{tmp_path.name}" if where == "gs" else str(tmp_path)
    left = [f"{output}/dead_letter/beam-temp-parse-0f3c/5b2e.jsonl",
            f"{output}/dead_letter/beam-temp-read-77aa/sub/1e09.jsonl",
            f"{output}/dead_letter/.temp9d1e-4c2b/8f7a", f"{output}/dead_letter/parse-00000-of-00001.jsonl"]
    kept = [f"{output}/dead_letter/notes.txt", f"{output}/dead_letter/tempered.jsonl"]
    for path in left + kept:
        if where == "local":
            os.makedirs(os.path.dirname(path), exist_ok=True)
        with FileSystems.create(path) as handle:
            handle.write(b"x")
    if where == "local":
        os.makedirs(f"{output}/dead_letter/beam-temp-tokenize-empty")
    ownership.remove_dead_letters(output, DEAD_LETTER_STAGES)
    assert list_paths(f"{output}/dead_letter/**") == sorted(kept)
    if where == "local":
        assert sorted(os.listdir(f"{output}/dead_letter")) == ["notes.txt", "tempered.jsonl"]
