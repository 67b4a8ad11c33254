"""ARC-AGI tasks: {"task_id", "train": [{"input", "output"}], "test": [{"input", "output"?}]}."""

from __future__ import annotations

import dataclasses

from beam_extract.records.errors import InvalidRecord, check_id

Grid = tuple[tuple[int, ...], ...]
MAX_GRID_SIDE = 30
# ARC tasks have a handful of each; these bound the work one line can cause (every test input is a
# prompt per view, each fitted by up to log2(train) renders of all its grids).
MAX_EXAMPLES = {"train": 64, "test": 16}


@dataclasses.dataclass(frozen=True)
class ArcTask:
    task_id: str
    train: tuple[tuple[Grid, Grid], ...]
    test: tuple[tuple[Grid, Grid | None], ...]
    source: str
    line_number: int
    raw: str = ""  # the start of its input line, for dead letters of later stages


def validate_grid(value: object, where: str) -> Grid:
    if not isinstance(value, list) or not value or not all(isinstance(row, list) for row in value):
        raise InvalidRecord("wrong_type", f"{where} is not a non-empty list of rows")
    width = len(value[0])
    if any(len(row) != width for row in value) or width == 0:
        raise InvalidRecord("ragged_grid", f"{where} rows differ in length or are empty")
    if len(value) > MAX_GRID_SIDE or width > MAX_GRID_SIDE:
        raise InvalidRecord("grid_too_large", f"{where} is {len(value)}x{width}, over {MAX_GRID_SIDE}x{MAX_GRID_SIDE}")
    for row in value:
        for cell in row:
            if not isinstance(cell, int) or isinstance(cell, bool):
                raise InvalidRecord("wrong_type", f"{where} holds a {type(cell).__name__}, not an int")
            if not 0 <= cell <= 9:
                raise InvalidRecord("value_out_of_range", f"{where} holds {cell}, outside 0..9")
    return tuple(tuple(row) for row in value)


def _pairs(obj: dict, split: str, output_required: bool) -> tuple:
    if split not in obj:
        raise InvalidRecord("missing_field", f"no {split!r} field")
    examples = obj[split]
    if not isinstance(examples, list):
        raise InvalidRecord("wrong_type", f"{split!r} is not a list")
    if not examples:
        raise InvalidRecord(f"empty_{split}", f"{split!r} has no examples")
    if len(examples) > MAX_EXAMPLES[split]:
        raise InvalidRecord("too_many_examples", f"{split!r} has {len(examples)} examples, over {MAX_EXAMPLES[split]}")
    pairs = []
    for i, example in enumerate(examples):
        where = f"{split}[{i}]"
        if not isinstance(example, dict):
            raise InvalidRecord("wrong_type", f"{where} is not an object")
        if "input" not in example or (output_required and "output" not in example):
            raise InvalidRecord("missing_field", f"{where} lacks input or output")
        output = example.get("output")
        pairs.append((validate_grid(example["input"], f"{where}.input"),
                      None if output is None else validate_grid(output, f"{where}.output")))
    return tuple(pairs)


def validate_task(obj: dict, source: str, line_number: int, name: str | None = None) -> ArcTask:
    """`name`: the file's name relative to the input root (see records.identity); default `source`.
    A task without an id is named by its file and line, however --input was spelled."""
    task_id = obj.get("task_id", f"{name or source}:{line_number}")
    if not isinstance(task_id, str) or not task_id:
        raise InvalidRecord("wrong_type", "task_id is not a non-empty string")
    check_id(task_id, "task_id")
    return ArcTask(task_id, _pairs(obj, "train", True), _pairs(obj, "test", False), source, line_number)
