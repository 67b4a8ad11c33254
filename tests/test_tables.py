"""Parquet and Arrow input (datasets' save_to_disk) and pre-tokenized rows, with the JSONL path's
guarantees: each test builds real files with pyarrow or `datasets` and reads them with our readers,
parser and tokenizer (in process), or runs the whole job (slow, end to end)."""

import dataclasses
import json
import os

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.testing.util import assert_that, equal_to

from beam_extract.io.sources import absolute_input
from beam_extract.io.tables import Columns, Part, ReadInput, columns_for, read_records, table_parts
from beam_extract.records import parse_line
from beam_extract.records.dead_letter import DEAD_LETTER, DeadLetter
from beam_extract.records.source_line import SourceLine, SourceRow
from beam_extract.records.text import TextDoc
from beam_extract.records.tokens import TokenDoc
from beam_extract.tokenize import Sample, TokenSelection, load_tokenizer, text_samples, token_samples
from beam_extract.model.weights import resolve_model_dir
from beam_extract.options import OPTIONS, JobOptions
from test_integrity import files_on_disk, manifest, records
from test_pipeline_default_run import run_guarded

TEXT = Columns(("text", "id"), "text")
WORDS = "river valley stone water flood sea hill sand wind rain".split()


def options(**changed) -> JobOptions:
    """The default options with `changed`."""
    return JobOptions(**{**{option.name: option.default for option in OPTIONS}, **changed})


def documents(n: int = 30) -> list[dict]:
    """FineWeb-like rows: varied lengths (some over 64 tokens, for windows), a null text and one
    that is not a string, a nested copy of the text under meta.text."""
    rng = np.random.default_rng(3)
    rows = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS, int(rng.integers(3, 120))))
        rows.append({"id": f"doc-{i}", "text": text, "meta": {"text": text, "lang": "en"}})
    rows[4]["text"] = rows[4]["meta"]["text"] = None
    rows[9]["text"] = rows[9]["meta"]["text"] = 12345
    return rows


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def write_parquet(path, rows, row_group_size=8, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size, **kwargs)


def typed(rows):
    """The rows one Parquet column type can hold: the integer text is left out (callers that
    need it write it to a file of its own)."""
    return [r for r in rows if not isinstance(r["text"], int)]


# -- readers, in process ------------------------------------------------------------------------

def test_parquet_row_groups_are_parts_numbered_through_the_file(tmp_path):
    rows = typed(documents())
    write_parquet(tmp_path / "a.parquet", rows, row_group_size=8)
    parts = list(table_parts(str(tmp_path / "a.parquet")))
    assert [(p.row_group, p.first_row, p.rows) for p in parts] == [(0, 1, 8), (1, 9, 8), (2, 17, 8), (3, 25, 5)]
    read = list(read_records(str(tmp_path / "a.parquet"), Columns(("meta.text", "id"), "meta.text")))
    assert [r.line_number for r in read] == list(range(1, len(rows) + 1))
    # Only the columns needed: the nested one whole (its struct), the id; not `text`.
    assert read[0].row == {"meta": rows[0]["meta"], "id": "doc-0"}
    # One part alone gives its rows with their numbers in the file.
    from beam_extract.io.tables import read_part
    assert [r.line_number for r in read_part(parts[2], TEXT)] == list(range(17, 25))


def test_table_rows_parse_as_the_same_json_lines(tmp_path):
    rows = documents()
    write_jsonl(tmp_path / "d.jsonl", rows)
    write_parquet(tmp_path / "d.parquet", typed(rows))
    write_parquet(tmp_path / "n.parquet", [r for r in rows if isinstance(r["text"], int)])
    lines = list(read_records(str(tmp_path / "d.jsonl"), TEXT))
    table = {r.row["id"]: r for name in ("d.parquet", "n.parquet")
             for r in read_records(str(tmp_path / name), columns_for(
                 options(input_format="text", text_field="meta.text")))}
    assert all(isinstance(r, SourceRow) for r in table.values()) and len(table) == len(rows)
    for line in lines:
        from_line = parse_line(line, "text", "meta.text", str(tmp_path))
        row = table[json.loads(line.data)["id"]]
        from_row = parse_line(row, "text", "meta.text", str(tmp_path))
        assert type(from_row) is type(from_line)
        if isinstance(from_line, TextDoc):
            assert (from_row.text, from_row.doc_id) == (from_line.text, from_line.doc_id)
            assert from_row.key.startswith(("d.parquet:", "n.parquet:")) and from_line.key == f"d.jsonl:{line.line_number}"
        else:
            assert (from_row.reason, from_row.detail, from_row.record_id) == (from_line.reason, from_line.detail,
                                                                              from_line.record_id)
            # The row as JSON, its strings' starts: here all of it, as the line's raw holds the line.
            assert json.loads(from_row.raw) == {k: v for k, v in json.loads(from_line.raw).items() if k != "text"}
    reasons = sorted(parse_line(r, "text", "meta.text").reason for r in table.values()
                     if isinstance(parse_line(r, "text", "meta.text"), DeadLetter))
    assert reasons == ["wrong_type", "wrong_type"]  # the null and the integer
    # A missing column is missing_field, a missing nested parent too, as in a JSON object.
    assert parse_line(SourceRow("f", 1, {"id": 1}), "text", "meta.text").reason == "missing_field"
    assert parse_line(SourceRow("f", 1, {"meta": None}), "text", "meta.text").reason == "missing_field"


def test_a_file_without_the_wanted_columns_gives_each_row_as_missing_field(tmp_path):
    write_parquet(tmp_path / "other.parquet", [{"body": "a text under another name"}] * 3, row_group_size=2)
    read = list(read_records(str(tmp_path / "other.parquet"), TEXT))
    assert [r.line_number for r in read] == [1, 2, 3]
    assert {parse_line(r, "text").reason for r in read} == {"missing_field"}


def test_arc_tasks_in_parquet_parse_as_their_json_lines(tmp_path):
    grid = [[1, 0], [0, 2]]
    tasks = [{"task_id": "t1", "train": [{"input": grid, "output": grid}], "test": [{"input": grid}]},
             {"task_id": "t2", "train": [{"input": grid, "output": grid}], "test": [{"input": grid, "output": grid}]}]
    write_parquet(tmp_path / "arc.parquet", tasks)
    write_jsonl(tmp_path / "arc.jsonl", tasks)
    columns = columns_for(options(input_format="auto"))
    from_rows = [parse_line(r, "auto") for r in read_records(str(tmp_path / "arc.parquet"), columns)]
    from_lines = [parse_line(r, "auto") for r in read_records(str(tmp_path / "arc.jsonl"), columns)]
    assert [(t.task_id, t.train, t.test) for t in from_rows] == [(t.task_id, t.train, t.test) for t in from_lines]


def test_a_text_over_the_byte_limit_is_line_too_long_with_its_start(tmp_path):
    long_text = "é" * 3000  # 6000 bytes in UTF-8, 3000 characters
    write_parquet(tmp_path / "a.parquet", [{"text": "short", "id": 1}, {"text": long_text, "id": 2}])
    short, long = read_records(str(tmp_path / "a.parquet"), TEXT, max_line_bytes=4096)
    assert short.too_long == 0 and long.too_long == 6000
    letter = parse_line(long, "text")
    assert (letter.reason, letter.line_number, letter.stage) == ("line_too_long", 2, "parse")
    assert letter.raw.startswith('{"text": "éé') and len(letter.raw.encode()) <= 4096  # its start, as a line's
    assert isinstance(parse_line(short, "text"), TextDoc)


@pytest.mark.parametrize("kind", ["dictionary", "string_view", "large_string"])
def test_a_long_text_in_any_string_column_type_is_line_too_long(tmp_path, kind):
    """pandas writes its categories as dictionary columns; Arrow has string views: their texts are
    measured like plain strings, and a long one is cut before it becomes a Python string."""
    texts = pa.array(["short", "é" * 3000])
    column = {"dictionary": texts.dictionary_encode(), "string_view": texts.cast(pa.string_view()),
              "large_string": texts.cast(pa.large_string())}[kind]
    pq.write_table(pa.table({"text": column, "id": [1, 2]}), tmp_path / "a.parquet")
    short, long = read_records(str(tmp_path / "a.parquet"), TEXT, max_line_bytes=4096)
    assert short.too_long == 0 and long.too_long == 6000 and len(long.row["text"]) <= 4096
    assert parse_line(long, "text").reason == "line_too_long"
    assert isinstance(parse_line(short, "text"), TextDoc)


def test_ids_of_token_rows_are_bounded_as_text_ids_are():
    row = SourceRow("t.parquet", 1, {"input_ids": [1, 2], "id": "x" * 3000})
    assert parse_line(row, "tokens").reason == "id_too_long"
    assert parse_line(row, "text").reason == "missing_field"  # (a text row: the same id is refused too)
    assert parse_line(SourceRow("t.parquet", 1, {"input_ids": [1, 2], "id": "x" * 1024}), "tokens").doc_id == "x" * 1024


def flip(path, at):
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def reads(path, columns=TEXT):
    items = list(read_records(str(path), columns))
    good = [i for i in items if isinstance(i, SourceRow)]
    bad = [i for i in items if isinstance(i, DeadLetter)]
    for letter in bad:
        assert letter.stage == "read" and letter.source == str(path) and str(path) in letter.detail
    return good, bad


def corrupt_a_page(path, row_group=1):
    """Flips a byte inside the data of the text column's pages in one row group."""
    column = pq.ParquetFile(path).metadata.row_group(row_group).column(0)
    start = column.dictionary_page_offset or column.data_page_offset
    flip(path, start + column.total_compressed_size - 8)


def test_truncated_and_corrupt_table_files_are_dead_letters_naming_the_file(tmp_path):
    rows = typed(documents())
    write_parquet(tmp_path / "whole.parquet", rows, write_page_checksum=True)
    data = (tmp_path / "whole.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    good, bad = reads(tmp_path / "cut.parquet")
    assert good == [] and [b.reason for b in bad] == ["truncated_file"] and "footer" in bad[0].detail

    (tmp_path / "page.parquet").write_bytes(data)
    corrupt_a_page(tmp_path / "page.parquet", row_group=1)
    good, bad = reads(tmp_path / "page.parquet")
    assert [b.reason for b in bad] == ["corrupt_file"] and "row group 1 (rows 9 to 16)" in bad[0].detail
    assert bad[0].line_number == 8  # the rows before the failure, numbered as a cut JSONL file's
    assert [r.line_number for r in good] == [n for n in range(1, len(rows) + 1) if not 9 <= n <= 16]

    (tmp_path / "text.parquet").write_text("not parquet at all, but it ends with PAR1")
    assert [b.reason for b in reads(tmp_path / "text.parquet")[1]] == ["corrupt_file"]
    assert [b.reason for b in reads(tmp_path / "gone.parquet")[1]] == ["unreadable_file"]

    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    arrow = tmp_path / "ds" / "data-00000-of-00001.arrow"
    good, bad = reads(arrow)
    assert bad == [] and [r.row["text"] for r in good] == [r["text"] for r in rows]
    whole = arrow.read_bytes()
    # Cut before the end-of-stream marker (every batch whole), and inside a message.
    for cut_at, complete in ((len(whole) - 8, True), (len(whole) // 2, False)):
        (tmp_path / "cut.arrow").write_bytes(whole[:cut_at])
        good, bad = reads(tmp_path / "cut.arrow")
        assert [b.reason for b in bad] == ["truncated_file"] and bad[0].line_number == len(good)
        assert (len(good) == len(rows)) == complete
        assert [r.row["text"] for r in good] == [r["text"] for r in rows[: len(good)]]
    # Two streams back to back, or bytes after one: Arrow stops at the first end-of-stream marker.
    for tail in (whole, b"garbage!"):
        (tmp_path / "more.arrow").write_bytes(whole + tail)
        good, bad = reads(tmp_path / "more.arrow")
        assert [b.reason for b in bad] == ["corrupt_file"] and f"{len(tail)} bytes follow" in bad[0].detail
        assert len(good) == len(rows) == bad[0].line_number


def test_read_input_spreads_row_groups_and_sends_bad_files_to_dead_letters(tmp_path):
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    rows = typed(documents())
    write_parquet(tmp_path / "a.parquet", rows, row_group_size=5, write_page_checksum=True)
    write_jsonl(tmp_path / "b.jsonl", rows[:3])
    data = (tmp_path / "a.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[:-100])
    paths = sorted(str(p) for p in tmp_path.iterdir())
    with beam.Pipeline(runner=FnApiRunner()) as pipeline:
        read = pipeline | beam.Create(paths) | ReadInput(TEXT)
        assert_that(read["lines"] | beam.Map(lambda r: (os.path.basename(r.path), r.line_number)),
                    equal_to([("a.parquet", n) for n in range(1, len(rows) + 1)] + [("b.jsonl", n) for n in (1, 2, 3)]),
                    label="Rows")
        assert_that(read[DEAD_LETTER] | beam.Map(lambda d: (os.path.basename(d.source), d.reason)),
                    equal_to([("cut.parquet", "truncated_file")]), label="DeadLetters")


def test_a_saved_dataset_directory_is_its_arrow_files(tmp_path):
    import datasets

    datasets.Dataset.from_list(typed(documents())).save_to_disk(str(tmp_path / "ds"), num_shards=2)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(typed(documents())[:4])}).save_to_disk(str(tmp_path / "dd"))
    assert absolute_input(str(tmp_path / "ds")) == f"{tmp_path}/ds/data-*.arrow"
    assert absolute_input(str(tmp_path / "dd") + "/") == f"{tmp_path}/dd/*/data-*.arrow"
    matched = FileSystems.match([absolute_input(str(tmp_path / "ds"))])[0].metadata_list
    assert sorted(os.path.basename(m.path) for m in matched) == ["data-00000-of-00002.arrow",
                                                                 "data-00001-of-00002.arrow"]


GCS_SERVERS = ["gcs_bucket", "gcs_with_preconditions"]  # gcp-storage-emulator, fake-gcs-server


@pytest.mark.parametrize("server", GCS_SERVERS)
def test_parquet_on_gcs_is_read_by_row_groups(server, request, tmp_path):
    gcs_bucket = request.getfixturevalue(server)
    rows = typed(documents())
    write_parquet(tmp_path / "a.parquet", rows, row_group_size=10)
    url = f"{gcs_bucket}/tables/a.parquet"
    with FileSystems.create(url, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        handle.write((tmp_path / "a.parquet").read_bytes())
    assert [p.rows for p in table_parts(url)] == [10, 10, 9]
    good, bad = reads(url)
    assert bad == [] and [r.row["text"] for r in good] == [r["text"] for r in rows]
    assert [b.reason for b in reads(f"{gcs_bucket}/tables/missing.parquet")[1]] == ["unreadable_file"]


# -- pre-tokenized rows, in process --------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model_dir("tiny-random-qwen2", weights=False))


def test_token_rows_give_the_text_paths_windows(tokenizer):
    doc = TextDoc("a.jsonl:1", " ".join(WORDS * 12), "a.jsonl", 1, "d1")
    from_text = text_samples(doc, tokenizer, 32, TokenSelection())
    ids = np.concatenate([s.token_ids for s in from_text]).tolist()
    row = parse_line(SourceRow("a.parquet", 1, {"input_ids": ids, "id": "d1"}), "tokens")
    assert isinstance(row, TokenDoc) and row.key == "a.parquet:1"
    from_rows = token_samples(dataclasses.replace(row, key="a.jsonl:1"), tokenizer, 32, TokenSelection(), 151936)
    assert len(from_text) > 2 and len(from_rows) == len(from_text)
    for text_sample, row_sample in zip(from_text, from_rows):
        assert row_sample.sample_id == text_sample.sample_id and row_sample.doc_id == "d1"
        np.testing.assert_array_equal(row_sample.token_ids, text_sample.token_ids)


def test_token_rows_out_of_range_or_not_ids_are_dead_letters(tokenizer):
    def tokens(row, field=""):
        return parse_line(SourceRow("t.parquet", 7, row), "tokens", tokens_field=field)

    for bad in (151936, -1, 2**40, 2**63, 2**64 - 1):  # past int64 too (a uint64 column holds them)
        [letter] = token_samples(tokens({"tokens": [1, bad, 2]}), tokenizer, 64, TokenSelection(), 151936)
        assert letter.reason == "token_out_of_range" and str(bad) in letter.detail
    assert tokens({"ids": [1, 2]}).reason == "missing_field"
    assert tokens({"x": {"ids": [1, 2]}}, "x.ids").token_ids == (1, 2)
    assert tokens({"input_ids": [1, 2.0]}).reason == "wrong_type"
    assert tokens({"input_ids": [1, True]}).reason == "wrong_type"
    assert tokens({"input_ids": "1 2"}).reason == "wrong_type"
    assert tokens({"input_ids": []}).reason == "empty_text"
    # JSONL lines of ids are read alike.
    line = SourceLine("t.jsonl", 1, json.dumps({"input_ids": [5, 6], "id": 3}).encode())
    doc = parse_line(line, "tokens")
    assert doc.token_ids == (5, 6) and doc.doc_id == "3"
    # With --prepend_bos each window starts with the tokenizer's prefix (Qwen has none: no change).
    [sample] = token_samples(doc, tokenizer, 64, TokenSelection(), 151936, prepend_bos=True)
    assert sample.token_ids.tolist() == [5, 6]


def test_special_ids_in_a_token_row_are_not_stored_when_excluded(tokenizer):
    special = tokenizer.convert_tokens_to_ids("<|im_start|>")
    doc = TokenDoc("a:1", (special, 5, 6, special, 7), "a", 1)
    [sample] = token_samples(doc, tokenizer, 64, TokenSelection(excluded_ids=frozenset({special})), 151936)
    assert isinstance(sample, Sample) and sample.stored.tolist() == [1, 2, 4]


# -- the whole job, end to end --------------------------------------------------------------------

# One row length (the only bucket) and no packing: every sample is computed in the same shape, so
# a document's activations do not depend on which file it came from or what it was batched with.
E2E = ["--runner=DirectRunner", "--layers=0,2", "--sites=resid_post", "--max_seq_len=64", "--buckets=64",
       "--packing=off", "--batch_size=4"]


def cli(cwd, *args):
    result = run_guarded([*E2E, *args], cwd, cwd / "connections.log")
    assert not (cwd / "connections.log").exists()
    return result


def by_document(output, name_prefix=""):
    """(hook, doc_id, window) -> record of the files whose names start with `name_prefix`."""
    return {(hook, r["doc_id"], sample_id.rpartition("#")[2]): r for (hook, sample_id), r in records(output).items()
            if sample_id.startswith(name_prefix)}


def assert_same_documents(found, expected):
    assert found.keys() == expected.keys() and len(found) > 40
    for key, record in found.items():
        np.testing.assert_array_equal(record["token_ids"], expected[key]["token_ids"])
        np.testing.assert_allclose(record["activations"], expected[key]["activations"], rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """The same documents as JSONL and as Parquet (several row groups; the integer text in a file
    of its own, as one Parquet column has one type), read by their nested field in one job."""
    work = tmp_path_factory.mktemp("tables")
    rows = documents()
    write_jsonl(work / "in" / "docs.jsonl", rows)
    write_parquet(work / "in" / "docs.parquet", typed(rows), row_group_size=8)
    write_parquet(work / "in" / "number.parquet", [r for r in rows if isinstance(r["text"], int)])
    result = cli(work, "--input=in/*", "--output=out", "--text_field=meta.text")
    assert result.returncode == 0, result.stderr[-3000:]
    return work, rows


@pytest.mark.slow
def test_parquet_gives_the_jsonl_documents_activations(text_run):
    work, rows = text_run
    found = manifest(work / "out")
    assert found["ok"] and found["counts"]["lines_read"] == 2 * len(rows) and found["counts"]["lines_unaccounted"] == 0
    assert found["counts"]["dead_letters"] == {"wrong_type": 4}  # the null and the integer, of each format
    letters = [json.loads(line) for line in (work / "out/dead_letter/parse-00000-of-00001.jsonl").read_text().splitlines()]
    assert sorted((os.path.basename(d["source"]), d["line_number"]) for d in letters) == [
        ("docs.jsonl", 5), ("docs.jsonl", 10), ("docs.parquet", 5), ("number.parquet", 1)]
    assert_same_documents(by_document(work / "out", "docs.parquet:"), by_document(work / "out", "docs.jsonl:"))
    inputs = json.loads((work / "out/_run/inputs.json").read_text())
    assert sorted(inputs["files"]) == ["docs.jsonl", "docs.parquet", "number.parquet"]
    assert inputs["files"]["docs.parquet"]["size"] == (work / "in/docs.parquet").stat().st_size


@pytest.mark.slow
def test_a_saved_dataset_folder_gives_the_jsonl_documents_activations(text_run):
    import datasets

    work, rows = text_run
    datasets.Dataset.from_list(typed(rows)).save_to_disk(str(work / "ds"), num_shards=2)
    result = cli(work, "--input=ds", "--output=ds-out", "--text_field=meta.text")
    assert result.returncode == 0, result.stderr[-3000:]
    found = by_document(work / "ds-out")
    assert {s.partition(":")[0] for (_, s), _ in records(work / "ds-out").items()} == {
        "data-00000-of-00002.arrow", "data-00001-of-00002.arrow"}
    assert_same_documents(found, by_document(work / "out", "docs.jsonl:"))
    assert manifest(work / "ds-out")["counts"]["dead_letters"] == {"wrong_type": 1}  # the null


@pytest.mark.slow
def test_pre_tokenized_rows_give_the_text_paths_tokens_and_activations(text_run, tokenizer):
    from beam_extract.tokenize import text_token_ids

    work, rows = text_run
    texts = [r for r in rows if isinstance(r["text"], str)]
    token_rows = [{"input_ids": text_token_ids(tokenizer, r["text"]).tolist(), "id": r["id"]} for r in texts]
    token_rows.append({"input_ids": [1, 151936, 2], "id": "past-the-vocabulary"})
    write_parquet(work / "tokens" / "rows.parquet", token_rows, row_group_size=10)
    result = cli(work, "--input=tokens/*.parquet", "--output=tokens-out", "--input_format=tokens")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_documents(by_document(work / "tokens-out"), by_document(work / "out", "docs.jsonl:"))
    found = manifest(work / "tokens-out")
    assert found["counts"]["dead_letters"] == {"token_out_of_range": 1} and found["counts"]["lines_unaccounted"] == 0
    [letter] = [json.loads(line) for line in
                (work / "tokens-out/dead_letter/tokenize-00000-of-00001.jsonl").read_text().splitlines()]
    assert letter["line_number"] == len(token_rows) and "151936" in letter["detail"]


@pytest.mark.slow
def test_bad_parquet_files_are_dead_letters_and_a_changed_one_refuses_resume(tmp_path):
    rows = typed(documents())
    write_parquet(tmp_path / "in" / "good.parquet", rows, row_group_size=8, write_page_checksum=True)
    data = (tmp_path / "in/good.parquet").read_bytes()
    (tmp_path / "in/cut.parquet").write_bytes(data[: len(data) // 2])
    (tmp_path / "in/page.parquet").write_bytes(data)
    corrupt_a_page(tmp_path / "in/page.parquet", row_group=1)
    result = cli(tmp_path, "--input=in/*.parquet", "--output=out")
    assert result.returncode == 1 and "NOT OK" in result.stdout, result.stderr[-3000:]
    assert "input files were not read to their end" in result.stdout
    found = manifest(tmp_path / "out")
    assert not found["ok"] and found["counts"]["lines_unaccounted"] == 0
    assert {k: v for k, v in found["counts"]["dead_letters"].items() if k != "wrong_type"} == {
        "truncated_file": 1, "corrupt_file": 1}
    letters = [json.loads(line) for line in (tmp_path / "out/dead_letter/read-00000-of-00001.jsonl").read_text()
               .splitlines()]
    assert sorted((os.path.basename(d["source"]), d["reason"]) for d in letters) == [
        ("cut.parquet", "truncated_file"), ("page.parquet", "corrupt_file")]
    assert all(d["source"] in d["detail"] for d in letters)
    written = {s.partition(":")[0]: 0 for (_, s) in records(tmp_path / "out")}
    assert set(written) == {"good.parquet", "page.parquet"}  # the other files, and the other row groups
    # The Parquet file changes: a resume is refused, and nothing in the output is touched.
    before = files_on_disk(tmp_path / "out")
    write_parquet(tmp_path / "in" / "good.parquet", rows[:-1], row_group_size=8)
    refused = cli(tmp_path, "--input=in/*.parquet", "--output=out", "--resume")
    assert refused.returncode == 2 and "good.parquet changed" in refused.stderr, refused.stderr[-2000:]
    assert files_on_disk(tmp_path / "out") == before


@pytest.mark.slow
def test_parquet_on_gcs_runs_and_resumes(tmp_path, gcs_with_preconditions):
    gcs_bucket = gcs_with_preconditions  # fake-gcs-server
    rows = typed(documents())
    write_parquet(tmp_path / "a.parquet", rows, row_group_size=8)
    with FileSystems.create(f"{gcs_bucket}/fineweb/a.parquet", compression_type=CompressionTypes.UNCOMPRESSED) as out:
        out.write((tmp_path / "a.parquet").read_bytes())
    result = cli(tmp_path, f"--input={gcs_bucket}/fineweb/*.parquet", "--output=out")
    assert result.returncode == 0, result.stderr[-3000:]
    counts = manifest(tmp_path / "out")["counts"]
    assert counts["lines_read"] == len(rows) and counts["samples"] > len(rows)
    inputs = json.loads((tmp_path / "out/_run/inputs.json").read_text())
    assert inputs["root"] == f"{gcs_bucket}/fineweb" and list(inputs["files"]) == ["a.parquet"]
    again = cli(tmp_path, f"--input={gcs_bucket}/fineweb/*.parquet", "--output=out", "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = manifest(tmp_path / "out")["counts"]
    assert resumed["samples_resumed"] == counts["samples"] and resumed["samples_extracted_now"] == 0


# -- preview and the driver's checks on every format -----------------------------------------------

def test_preview_stats_read_parquet_arrow_and_token_rows(tmp_path, capsys, tokenizer):
    import datasets
    from beam_extract import preview
    from beam_extract.tokenize import text_token_ids

    rows = typed(documents())
    write_jsonl(tmp_path / "j" / "docs.jsonl", rows)
    write_parquet(tmp_path / "p" / "docs.parquet", rows)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    write_parquet(tmp_path / "t" / "rows.parquet", [{"tokens": text_token_ids(tokenizer, r["text"]).tolist()}
                                                    for r in rows if r["text"]] + [{"tokens": [151936]}])
    common = ["--max_seq_len=64", "--layers=0", "--num=1", "--stats"]
    summaries = {}
    for name, args in {"jsonl": ["--input", f"{tmp_path}/j/*.jsonl", "--text_field=meta.text"],
                       "parquet": ["--input", f"{tmp_path}/p/*.parquet", "--text_field=meta.text"],
                       "arrow": ["--input", str(tmp_path / "ds"), "--text_field=meta.text"],
                       "tokens": ["--input", f"{tmp_path}/t/*.parquet", "--input_format=tokens"]}.items():
        preview.main([*common, *args])
        out = capsys.readouterr().out
        # Bytes differ with the file names in the records: the samples, lengths and tokens do not.
        summaries[name] = [line.partition(" in float32")[0] for line in out.splitlines()
                           if " samples: tokens min" in line or line.startswith("output: ")]
        assert "=== docs" in out or "=== data-" in out or "=== rows.parquet:1#w0" in out
    assert summaries["parquet"] == summaries["arrow"] == summaries["jsonl"]
    assert "dead letters: {'wrong_type': 1}" in summaries["jsonl"][0]
    # The same windows and tokens; the text's null row is missing from the token rows, the bad id is there.
    assert summaries["tokens"][0].replace("{'token_out_of_range': 1}", "X") == \
        summaries["jsonl"][0].replace("{'wrong_type': 1}", "X")


@pytest.mark.parametrize("args, message", [
    (["--prepend_bos"], "--prepend_bos: the tokenizer of --model tiny-random-qwen2 puts nothing before a text"),
    (["--positions=5:2"], "turn a row of token ids into a dead letter (no_tokens_selected"),
])
def test_the_dry_render_checks_token_rows(tmp_path, args, message):
    from apache_beam.options.pipeline_options import PipelineOptions

    from beam_extract.job import make_job
    from beam_extract.options import UsageError

    write_parquet(tmp_path / "rows.parquet", [{"input_ids": [1, 2, 3]}])
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        make_job(PipelineOptions([f"--input={tmp_path}/rows.parquet", "--input_format=tokens",
                                  f"--output={tmp_path}/out", *args]))
    assert not (tmp_path / "out").exists()
