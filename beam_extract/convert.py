"""`python -m beam_extract.convert`: Hugging Face barc-format rows -> our ARC JSONL.

A barc row has a column `examples`: a list of [input, output] grid pairs; the last pair becomes the
test. Task ids are `{file stem}-{row}-{content hash}`: deterministic and globally unique. Rows that
fail validation are reported with their reason in `OUTPUT.rejects.jsonl`, never silently dropped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

from beam_extract.io.sources import match_paths, read_lines
from beam_extract.records.arc import ArcTask, validate_task
from beam_extract.records.dead_letter import DeadLetter
from beam_extract.records.errors import InvalidRecord
from beam_extract.records.parse import decode_json_object


def barc_rows(path: str) -> Iterator[tuple[int, object]]:
    """(row number, examples value) of a parquet or JSONL file; a bad JSON line yields its error."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024, columns=["examples"]):
            for examples in batch.column(0).to_pylist():
                yield row, examples
                row += 1
        return
    for line in read_lines(path):
        if isinstance(line, DeadLetter):  # the file failed after line.line_number lines
            yield line.line_number, InvalidRecord(line.reason, line.detail)
            continue
        try:
            yield line.line_number - 1, decode_json_object(line.data).get("examples")
        except InvalidRecord as error:
            yield line.line_number - 1, error


def barc_to_task(examples: object, source: str, row: int) -> ArcTask:
    """Raises InvalidRecord with a reason for a row that is not a valid task."""
    if isinstance(examples, InvalidRecord):
        raise examples
    if not isinstance(examples, list) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in examples):
        raise InvalidRecord("wrong_type", "examples is not a list of [input, output] pairs")
    if len(examples) < 2:
        raise InvalidRecord("empty_train", f"{len(examples)} example(s): need at least one train pair and a test")
    digest = hashlib.sha256(json.dumps(examples, separators=(",", ":")).encode()).hexdigest()[:12]
    obj = {
        "task_id": f"{Path(source).stem}-{row}-{digest}",
        "train": [{"input": i, "output": o} for i, o in examples[:-1]],
        "test": [{"input": examples[-1][0], "output": examples[-1][1]}],
    }
    return validate_task(obj, source, row)


def task_json(task: ArcTask) -> str:
    return json.dumps({
        "task_id": task.task_id,
        "train": [{"input": i, "output": o} for i, o in task.train],
        "test": [{"input": i, "output": o} for i, o in task.test],
    }, separators=(",", ":"))


def convert(pattern: str, output: Path) -> tuple[int, int]:
    """Writes OUTPUT and OUTPUT.rejects.jsonl; returns (tasks written, rows rejected)."""
    written = rejected = 0
    rejects_path = output.with_name(output.name + ".rejects.jsonl")
    with open(output, "w") as out, open(rejects_path, "w") as rejects:
        for path in match_paths(pattern):
            for row, examples in barc_rows(path):
                try:
                    out.write(task_json(barc_to_task(examples, path, row)) + "\n")
                    written += 1
                except InvalidRecord as error:
                    rejects.write(json.dumps({"source": path, "row": row, "reason": error.reason,
                                              "detail": str(error)}) + "\n")
                    rejected += 1
    return written, rejected


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m beam_extract.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="Glob of local .parquet or .jsonl barc files")
    parser.add_argument("--output", required=True, type=Path, help="ARC JSONL to write")
    args = parser.parse_args(argv)
    written, rejected = convert(args.input, args.output)
    print(f"wrote {written} tasks to {args.output}; {rejected} rows rejected"
          + (f" (reasons in {args.output}.rejects.jsonl)" if rejected else ""))


if __name__ == "__main__":
    main()
