"""Streaming: files arriving over time, driven by Beam's TestStream on the BundleBasedDirectRunner
(Beam 2.77's local runners cannot run the real file watcher, MatchContinuously).

Two things about that runner shape these tests:
- Its processing-time clock starts at the epoch and moves only when a TestStream says so, while
  BatchDoFn sets its flush timer from the wall clock (as Beam's GroupIntoBatches does), so each
  stream first moves the clock to now.
- It does not hold a stateful DoFn's output watermark for its pending event-time timers (Dataflow
  does), so a batch flushed at the end of a window would reach the window's totals after they were
  combined. The streams therefore let the flush timeout empty every buffer (TestStream's
  advance_processing_time) before they move the watermark past a window's end, and the windowed
  end-to-end run reads text only: ARC tasks pass a GroupByKey (unique task ids) that emits them at
  their window's end, so on this runner their batches would always come after the window's totals.
"""

import json
import shutil
import socket
import sys
import time
from collections import Counter
from pathlib import Path

import apache_beam as beam
import network_guard
import numpy as np
import pytest
from apache_beam.io import fileio
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.pipeline import PipelineVisitor
from apache_beam.testing import test_stream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import FixedWindows, TimestampedValue

from beam_extract.batching import BatchDoFn, BatchPlan
from beam_extract.hooks import parse_hook_name
from beam_extract.job import claim_output, make_job
from beam_extract.options import UsageError, template_switches
from beam_extract.pipeline import build, read_input, run
from beam_extract.sink.ownership import release_lock
from beam_extract.sink.writer import hook_dir
from beam_extract.tokenize import Sample

WORDS = ["river", "valley", "stone", "water", "flood", "sea", "hill", "sand", "wind", "rain"]
STREAMING = ["--streaming", "--runner=BundleBasedDirectRunner"]


def clock_at_now() -> test_stream.TestStream:
    """A TestStream whose processing-time clock (which starts at the epoch) is moved to the wall clock."""
    return test_stream.TestStream().advance_processing_time(int(time.time()))


# -- the flush timeout, on BatchDoFn alone ---------------------------------------------------------

def batches_of(stream: test_stream.TestStream, flush_seconds: int) -> tuple[beam.Pipeline, beam.PCollection]:
    plan = BatchPlan((16,), batch_size=4, tokens_per_batch=0, packing="off", pack_length=16,
                     flush_seconds=flush_seconds)
    pipeline = beam.Pipeline(options=PipelineOptions(STREAMING))
    batches = (
        pipeline
        | stream
        | beam.WindowInto(FixedWindows(60))
        | "OneKey" >> beam.Map(lambda sample: ((16, False, "one shard"), sample))
        | beam.ParDo(BatchDoFn(plan))
        | beam.Map(lambda batch: tuple(sorted(p.sample.sample_id for p in batch.placements)))
    )
    return pipeline, batches


def sample(name: str, at: float) -> TimestampedValue:
    return TimestampedValue(Sample(name, np.arange(1, 11, dtype=np.int32), "in.jsonl", 1), at)


def trickle(flush_seconds: int, wait_seconds: int, expected_batches: list) -> None:
    """Two samples, then `wait_seconds` of processing time, then a third, all in one window that
    closes at the end: the batches' sample ids are `expected_batches`."""
    stream = (clock_at_now().advance_watermark_to(0)
              .add_elements([sample("a", 1), sample("b", 2)])
              .advance_processing_time(wait_seconds)
              .add_elements([sample("c", 3)])
              .advance_watermark_to(60)  # the window's end, in its own step (see the top of the file)
              .advance_watermark_to_infinity())
    pipeline, batches = batches_of(stream, flush_seconds)
    assert_that(batches, equal_to(expected_batches))
    pipeline.run().wait_until_finish()


def test_a_partial_batch_is_flushed_once_its_first_sample_waited_flush_seconds():
    # Timeout passed: the two waiting samples go as a partial batch; the third follows on its own.
    trickle(flush_seconds=600, wait_seconds=3600, expected_batches=[("a", "b"), ("c",)])
    # Not yet passed: one batch at the end of the window.
    trickle(flush_seconds=600, wait_seconds=60, expected_batches=[("a", "b", "c")])
    # Batch jobs set no timeout (flush_seconds=0): the window's end flushes.
    trickle(flush_seconds=0, wait_seconds=3600, expected_batches=[("a", "b", "c")])


# -- wiring ---------------------------------------------------------------------------------------

def transforms(pipeline: beam.Pipeline, kind: type) -> list:
    """The transforms of a kind applied in a pipeline, composites included."""
    found = []

    class Visitor(PipelineVisitor):
        def enter_composite_transform(self, node):
            self.visit_transform(node)

        def visit_transform(self, node):
            if isinstance(node.transform, kind):
                found.append(node.transform)

    pipeline.visit(Visitor())
    return found


def test_streaming_watches_the_input_and_local_runners_are_refused(tmp_path):
    job = make_job(PipelineOptions([*STREAMING, f"--output={tmp_path}/out", "--poll_interval=17",
                                    "--window_seconds=120", "--flush_seconds=9"]))
    assert job.streaming and job.plan.flush_seconds == 9
    pipeline = beam.Pipeline(options=PipelineOptions(STREAMING))
    read_input(pipeline, job)
    watches = transforms(pipeline, fileio.MatchContinuously)
    assert [(w.file_pattern, w.interval, w.has_deduplication) for w in watches] == [(job.options.input, 17, True)]
    batch_pipeline = beam.Pipeline()
    read_input(batch_pipeline, make_job(PipelineOptions([f"--output={tmp_path}/out4"])))
    assert not transforms(batch_pipeline, fileio.MatchContinuously) and transforms(batch_pipeline, fileio.MatchFiles)
    batch = make_job(PipelineOptions([f"--output={tmp_path}/out2", "--flush_seconds=9"]))
    assert not batch.streaming and batch.plan.flush_seconds == 0
    for runner in ("DirectRunner", "FnApiRunner", "BundleBasedDirectRunner"):
        with pytest.raises(UsageError, match="cannot watch --input for new files; run it locally with "
                                             "--runner=PrismRunner"):
            run(["--streaming=true", f"--runner={runner}", f"--output={tmp_path}/out3"])


def test_streaming_takes_the_value_a_template_passes():
    def streaming(*argv):
        return PipelineOptions(template_switches(list(argv))).view_as(StandardOptions).streaming

    assert streaming("--streaming=true", "--model=m") and streaming("--streaming")
    assert not streaming("--streaming=false") and not streaming("--model=m")
    assert template_switches(["--streaming=false", "--input=a=b"]) == ["--input=a=b"]
    with pytest.raises(UsageError, match="--streaming: expected true or false, not 'maybe'"):  # one line, exit 2
        template_switches(["--streaming=maybe"])


# -- end to end: files arriving in three windows ---------------------------------------------------

WINDOW = 60
HOOKS = tuple(f"blocks.{layer}.hook_{site}" for site in ("resid_post", "mlp_out") for layer in (0, 3))
OPTIONS = ["--input_format=text", "--max_seq_len=512", "--buckets=128,512", "--packing=off", "--batch_size=4",
           "--layers=0,3", "--sites=resid_post,mlp_out", f"--window_seconds={WINDOW}", "--flush_seconds=600"]


def make_inputs(directory: Path) -> dict[str, tuple[int, float]]:
    """Input files -> (lines, arrival time in seconds)."""
    rng = np.random.default_rng(7)

    def text_file(name, docs, longest):
        lines = [json.dumps({"id": f"{name}-{d}", "text": " ".join(rng.choice(WORDS, rng.integers(3, longest)))})
                 for d in range(docs)]
        (directory / f"{name}.jsonl").write_text("\n".join(lines) + "\n")

    text_file("text-0", 6, 100)
    text_file("text-1", 5, 100)
    text_file("text-2", 7, 100)
    text_file("text-3", 4, 300)
    text_file("trickle", 2, 10)  # two samples: less than one batch
    (directory / "bad.jsonl").write_text('{not json\n{"text": "   "}\n{"id": "fine", "text": "sea and sand"}\n')
    arrivals = {"text-0": 5, "text-3": 10, "bad": 20, "text-1": 65, "text-2": 90, "trickle": 130}
    return {f"{directory}/{name}.jsonl": (sum(1 for _ in open(f"{directory}/{name}.jsonl")), at)
            for name, at in arrivals.items()}


def stream_of(files: dict[str, tuple[int, float]]) -> test_stream.TestStream:
    """Files arriving at their times; before each window closes, processing time passes the flush
    timeout, so what the window's batches hold is flushed while the window is open."""
    stream = clock_at_now().advance_watermark_to(0)
    window_end = WINDOW
    for path, (_, at) in sorted(files.items(), key=lambda item: item[1][1]):
        if at >= window_end:
            stream = stream.advance_processing_time(3600).advance_watermark_to(window_end)
            window_end += WINDOW
        stream = stream.add_elements([TimestampedValue(path, at)])
    return stream.advance_processing_time(3600).advance_watermark_to_infinity()


def records_by_key(records) -> dict:
    found = {}
    for record in records:
        key = (record["hook_name"], record["sample_id"])
        assert key not in found, f"{key} read twice"
        found[key] = record
    return found


def run_streaming(directory: Path, files: dict, output: str, *extra: str) -> float:
    """The streaming job over `files` arriving, into directory/output; returns its seconds. Nothing
    of it reaches the network (the guard is removed afterwards)."""
    log = directory / f"{output}-connections.log"
    patch = pytest.MonkeyPatch()
    for name in ("connect", "connect_ex"):
        patch.setattr(socket.socket, name, getattr(socket.socket, name))
    patch.setattr(socket, "getaddrinfo", socket.getaddrinfo)
    network_guard.install(str(log))
    try:
        options = PipelineOptions([*STREAMING, f"--input={directory}/in/*.jsonl", f"--output={directory}/{output}",
                                   *OPTIONS, *extra])
        job = claim_output(make_job(options))
        pipeline = beam.Pipeline(options=options)
        build(pipeline | "Arrivals" >> stream_of(files), job)
        started = time.perf_counter()
        try:
            pipeline.run().wait_until_finish()
        finally:
            release_lock(job.output, job.lock)
        seconds = time.perf_counter() - started
    finally:
        patch.undo()
    assert not log.exists(), log.read_text()
    return seconds


@pytest.fixture(scope="module")
def streamed(tmp_path_factory):
    """A streaming run over files arriving in three windows, and a batch run over the same files."""
    directory = tmp_path_factory.mktemp("streaming")
    (directory / "in").mkdir()
    files = make_inputs(directory / "in")
    run([f"--input={directory}/in/*.jsonl", f"--output={directory}/batch", "--runner=DirectRunner", *OPTIONS])
    return directory, files, run_streaming(directory, files, "stream")


def window_of(at: float) -> int:
    return int(at // WINDOW)


@pytest.mark.slow
def test_each_window_indexes_its_own_lines_samples_records_and_dead_letters(streamed):
    from beam_extract.readers.reader import read_activations, read_windows

    directory, files, seconds = streamed
    batch = records_by_key(r for hook in HOOKS for r in read_activations(str(directory / "batch"), hook))
    # Where each line went in the batch run's records, by the window its file arrived in.
    arrived = {path: window_of(at) for path, (_, at) in files.items()}
    expected_samples = Counter(arrived[r["source"].rsplit(":", 1)[0]] for (hook, _), r in batch.items()
                               if hook == HOOKS[0])
    windows = read_windows(str(directory / "stream"))
    print(f"\nstreaming run: {seconds:.1f} s; per window:")
    for index in windows:
        print(" ", index["window"], index["counts"], {h: (v["records"], v["tokens"], len(v["files"]))
                                                       for h, v in index["hooks"].items()}, len(index["commits"]))
    assert [w["window"]["start"] for w in windows] == ["19700101T000000Z", "19700101T000100Z", "19700101T000200Z"]
    for number, index in enumerate(windows):
        counts = index["counts"]
        assert counts["lines_read"] == sum(lines for path, (lines, at) in files.items() if window_of(at) == number)
        assert counts["lines_unaccounted"] == 0
        assert counts["lines_with_samples"] + counts["lines_dead_lettered"] == counts["lines_read"]
        assert counts["samples"] == expected_samples[number] > 0
        assert counts["dead_letters"] == ({"invalid_json": 1, "empty_text": 1} if number == 0 else {})
        start = index["window"]["start"]
        for hook, part in index["hooks"].items():
            assert part["records"] == expected_samples[number]
            assert part["tokens"] == sum(r["n_tokens"] for (h, _), r in batch.items()
                                         if h == hook and arrived[r["source"].rsplit(":", 1)[0]] == number)
            # The window's files, and only they, carry its start in their names.
            in_window = (directory / "stream").glob(f"{hook_dir('.', parse_hook_name(hook, 4))}/part-w{start}-*")
            assert part["files"] and set(part["files"]) == {p.relative_to(directory / "stream").as_posix()
                                                            for p in in_window}
        commits = [json.loads((directory / f"stream/_committed/{c}.json").read_text()) for c in index["commits"]]
        assert commits and all(c["window"] == index["window"] for c in commits)
        dead = [json.loads(line) for f in index["dead_letter_files"]
                for line in (directory / "stream" / f).read_text().splitlines()]
        assert Counter(d["reason"] for d in dead) == Counter(counts["dead_letters"])
        assert all(f.startswith(f"dead_letter/parse-w{start}-") for f in index["dead_letter_files"])


@pytest.mark.slow
def test_each_sample_once_with_the_activations_of_a_batch_run(streamed):
    from beam_extract.format.commits import read_groups_on_disk
    from beam_extract.readers.reader import read_activations

    directory, files, _ = streamed
    committed = [s for c in read_groups_on_disk(str(directory / "stream")) for s in c["samples"]]
    assert len(committed) == len(set(committed))
    batch_manifest = json.loads((directory / "batch/manifest.json").read_text())
    good_lines = sum(lines for lines, _ in files.values()) - 2  # one short sample per document
    assert len(committed) == batch_manifest["counts"]["samples"] == good_lines
    for hook in HOOKS:
        streamed_records = records_by_key(read_activations(str(directory / "stream"), hook))
        batch_records = records_by_key(read_activations(str(directory / "batch"), hook))
        assert set(streamed_records) == set(batch_records)
        assert {s for _, s in streamed_records} == set(committed)
        for key, record in streamed_records.items():
            assert record["activations"].tobytes() == batch_records[key]["activations"].tobytes(), key
            np.testing.assert_array_equal(record["positions"], batch_records[key]["positions"])


@pytest.mark.slow
def test_partial_batches_are_extracted_while_their_window_is_open(streamed):
    """No window's samples fill whole batches of each row length (4 rows), and the last window is a
    trickle of two samples. On this runner a batch emitted at a window's end misses the window's
    totals (see the top of the file), so an index holding all its window's records shows that its
    partial batches were flushed by the timeout while the window was open."""
    from beam_extract.readers.reader import read_windows

    directory, _, _ = streamed
    windows = read_windows(str(directory / "stream"))
    assert all(w["batching"]["real_tokens"] < w["batching"]["computed_tokens"] for w in windows)  # partial batches
    assert all(w["counts"]["lines_with_samples"] + w["counts"]["lines_dead_lettered"] == w["counts"]["lines_read"]
               for w in windows)
    trickle_window = windows[-1]
    assert trickle_window["counts"]["samples"] == 2
    assert all(part["records"] == 2 for part in trickle_window["hooks"].values())


@pytest.mark.slow
def test_windowed_output_reads_back_with_the_normal_readers(streamed):
    from beam_extract.readers.reader import read_activations, tf_dataset, token_batches

    directory, _, _ = streamed
    output = str(directory / "stream")
    assert not (directory / "stream/manifest.json").exists()  # readers go through the commits
    for hook in HOOKS[:2]:
        numpy_records = records_by_key(read_activations(output, hook))
        tf_records = list(tf_dataset(output, hook).as_numpy_iterator())
        assert len(tf_records) == len(numpy_records)
        for record in tf_records:
            ours = numpy_records[(hook, record["sample_id"].decode())]
            np.testing.assert_array_equal(record["activations"], ours["activations"])
        tokens = sum(r["n_tokens"] for r in numpy_records.values())
        batches = list(token_batches(output, hook, batch_tokens=64, shuffle_buffer=256, seed=1))
        assert len(batches) == tokens // 64 and all(b.shape == (64, 64) for b in batches)
        everything = np.concatenate([r["activations"] for r in numpy_records.values()])
        drawn = np.concatenate(batches)
        assert np.isin(drawn[:, 0], everything[:, 0]).all()


@pytest.mark.slow
def test_a_restarted_streaming_job_resumes_without_writing_twice(streamed):
    from beam_extract.readers.reader import read_windows

    directory, files, _ = streamed
    shutil.copytree(directory / "stream", directory / "restarted")
    committed = sorted(p.name for p in (directory / "restarted/_committed").glob("*.json"))
    stray = (next((directory / "restarted").glob("*/layer_*"))
             / "part-w19700101T000000Z-0123456789ab-0123456789ab.tfrecord")
    stray.write_bytes(b"half a record")  # as a job killed between its rename and its commit leaves it
    run_streaming(directory, files, "restarted", "--resume")
    assert not stray.exists()
    assert sorted(p.name for p in (directory / "restarted/_committed").glob("*.json")) == committed
    for before, after in zip(read_windows(str(directory / "stream")), read_windows(str(directory / "restarted"))):
        assert after["counts"]["samples_resumed"] == after["counts"]["samples"] == before["counts"]["samples"]
        assert after["counts"]["samples_extracted_now"] == 0 and not after["commits"]
        # Lines whose samples were all committed are skipped, not read again: summed over the two
        # runs' windows, lines_read counts each line once (dead-lettered ones are read again: the
        # resumed run writes their dead letters anew).
        assert after["counts"]["lines_skipped"] == before["counts"]["lines_with_samples"] > 0
        assert after["counts"]["lines_with_samples"] == 0
        assert after["counts"]["lines_read"] == after["counts"]["lines_dead_lettered"] == \
            before["counts"]["lines_dead_lettered"]
        assert after["counts"]["lines_unaccounted"] == 0 and after["ok"]


# -- ARC task ids across windows -------------------------------------------------------------------

def arc_task(task_id: str, source: str, line: int, at: float) -> TimestampedValue:
    from beam_extract.records.arc import ArcTask

    return TimestampedValue(ArcTask(task_id, (), (), source, line), at)


@pytest.mark.parametrize("runner", ["BundleBasedDirectRunner", "PrismRunner"])
def test_a_task_id_reused_in_a_later_window_is_a_dead_letter(runner):
    """The attack of issue 26: a.jsonl's `dup1` arrives, and a window later b.jsonl with another
    `dup1` and `uniq2`. Only the first `dup1` goes on; the second is a duplicate_task_id dead letter
    naming the first's place, in the window it arrived in; each task stays in its own window."""
    from beam_extract.stages import DropDuplicateTasks

    if runner == "PrismRunner" and not (Path(sys.executable).parent / "prism").is_file():
        pytest.skip("prism is not installed (make prism); `make test` installs it")
    stream = (test_stream.TestStream().advance_watermark_to(0)
              .add_elements([arc_task("dup1", "a.jsonl", 1, 5), arc_task("twice", "a.jsonl", 2, 6),
                             arc_task("twice", "a.jsonl", 3, 7)])
              .advance_watermark_to(WINDOW)
              .add_elements([arc_task("dup1", "b.jsonl", 1, WINDOW + 10), arc_task("uniq2", "b.jsonl", 2, WINDOW + 11)])
              .advance_watermark_to(2 * WINDOW)
              .add_elements([arc_task("uniq2", "c.jsonl", 1, 2 * WINDOW + 1)])
              .advance_watermark_to_infinity())
    # Its own job server: Beam shares one per process, made with the options of the first Prism job,
    # and a test's bare beam.Pipeline() (the DirectRunner tries Prism first) may have made it.
    extra = [f"--prism_location={Path(sys.executable).parent / 'prism'}",
             "--experiments=disable_prism_server_singleton"] if runner == "PrismRunner" else []
    pipeline = beam.Pipeline(options=PipelineOptions(["--streaming", f"--runner={runner}", *extra]))
    records = pipeline | stream | beam.WindowInto(FixedWindows(WINDOW))
    tasks, dead = records | DropDuplicateTasks()

    def where(value, window=beam.DoFn.WindowParam):
        return value.task_id if hasattr(value, "task_id") else value.record_id, value.source, int(window.start)

    assert_that(tasks | "Tasks" >> beam.Map(where),
                equal_to([("dup1", "a.jsonl", 0), ("twice", "a.jsonl", 0), ("uniq2", "b.jsonl", WINDOW)]),
                label="FirstUses")
    assert_that(dead | "Dead" >> beam.Map(lambda d, window=beam.DoFn.WindowParam: (
                    d.record_id, d.source, d.reason, d.detail.rpartition(" ")[2], int(window.start))),
                equal_to([("twice", "a.jsonl", "duplicate_task_id", "a.jsonl:2", 0),
                          ("dup1", "b.jsonl", "duplicate_task_id", "a.jsonl:1", WINDOW),
                          ("uniq2", "c.jsonl", "duplicate_task_id", "b.jsonl:2", 2 * WINDOW)]),
                label="Duplicates")
    pipeline.run().wait_until_finish()


def test_a_resumed_windows_lines_committed_before_are_skipped_not_read():
    """Issue 26: a resumed streaming job re-reads every file in new windows; its indexes counted the
    lines the first run had committed as read again (84 lines read for 48). Per line: 1 and 2 only
    resumed (skipped); 3 resumed and extracted now; 4 extracted now; 5 dead-lettered; 6 resumed,
    with a sample dead-lettered now (changed_since_commit)."""
    from beam_extract.accounting.invariants import RunTotals
    from beam_extract.accounting.lines import CountLineOutcomes, LineBitmaps
    from beam_extract.sink.windows import window_index

    def bits(lines, produced=True):
        marks = LineBitmaps()
        acc = marks.create_accumulator()
        for line in lines:
            acc = marks.add_input(acc, (line, produced))
        return marks.extract_output(acc)

    written, dead, resumed = bits([3, 4]), bits([5, 6], produced=False), bits([1, 2, 3, 6])
    outcomes = CountLineOutcomes()
    acc = outcomes.create_accumulator()
    for bitmaps in (written, dead, (b"", b"", resumed[0])):
        acc = outcomes.add_input(acc, bitmaps)
    lines = outcomes.extract_output(acc)
    assert lines == {"with_samples": 5, "dead_lettered": 1, "skipped": 2}
    index = window_index(("19700101T000000Z", "19700101T000100Z"), "out", (), RunTotals(
        lines_read=6, lines=lines, samples=3, resumed=5, committed_ids={"total": 2, "distinct": 2},
        dead_letters={"changed_since_commit": 1, "invalid_json": 1}), 64, 0)
    counts = index["counts"]
    assert (counts["lines_read"], counts["lines_skipped"], counts["lines_with_samples"],
            counts["lines_dead_lettered"], counts["lines_unaccounted"]) == (4, 2, 3, 1, 0)
