"""A record of input that could not become activations, with the reason, kept for the user."""

from __future__ import annotations

import dataclasses
import json

# The tagged output every stage sends its dead letters to.
DEAD_LETTER = "dead_letter"
# Raw input kept in a dead letter is cut to this many bytes: enough to find and fix the line.
MAX_RAW_BYTES = 4096


# Every reason code, by the stage that gives it (the README lists the same; a test compares them).
REASONS: dict[str, tuple[str, ...]] = {
    "read": ("truncated_file", "corrupt_file", "unreadable_file", "bad_file_name", "not_a_file",
             "expansion_too_large", "blank_lines"),
    "parse": ("line_too_long", "invalid_json", "invalid_utf8", "invalid_unicode", "not_an_object", "missing_field",
              "wrong_type", "empty_text", "blank_line", "ragged_grid", "value_out_of_range", "grid_too_large",
              "empty_train", "empty_test", "too_many_examples", "id_too_long"),
    "dedup": ("duplicate_task_id",),
    "tokenize": ("too_long", "no_tokens_selected", "token_out_of_range", "no_chat_template", "tokenizer_error",
                 "run_too_long"),
    "resume": ("changed_since_commit",),
    "extract": ("model_oom", "non_finite"),
}


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    source: str
    line_number: int
    stage: str  # a key of REASONS
    reason: str  # a stable code of that stage, e.g. invalid_json, too_long
    detail: str
    raw: str = ""  # the start of the input line (MAX_RAW_BYTES), where the stage still has it
    record_id: str = ""  # the task id, document (file:line) or sample id, where known

    def __post_init__(self):
        if self.reason not in REASONS.get(self.stage, ()):
            raise ValueError(f"dead letter reason {self.reason!r} is not one of stage {self.stage!r}'s")

    def to_json(self) -> str:
        """Always encodable as UTF-8: a lone surrogate from the input is written as an escape."""
        text = json.dumps(dataclasses.asdict(self), ensure_ascii=False)
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def raw_excerpt(data: bytes) -> str:
    return data[:MAX_RAW_BYTES].decode("utf-8", errors="backslashreplace")
