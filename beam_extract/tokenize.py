"""Records -> token-id samples: text split into windows, ARC tasks rendered through the chat template."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import transformers

from beam_extract.arc.prompt import prompt_messages
from beam_extract.records.arc import ArcTask
from beam_extract.records.dead_letter import DeadLetter
from beam_extract.records.text import TextDoc

END_OF_TURN = "<|im_end|>"


@dataclasses.dataclass(frozen=True)
class Sample:
    sample_id: str  # unique and deterministic: the same input and options give the same id
    token_ids: np.ndarray  # int32 [n]
    source: str
    line_number: int
    task_id: str = ""
    augmentation: str = ""  # JSON of the ARC view's parameters


def load_tokenizer(model_dir: str | Path) -> transformers.PreTrainedTokenizerBase:
    return transformers.AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)


def _ids(tokenizer: transformers.PreTrainedTokenizerBase, text: str) -> np.ndarray:
    # No BOS/EOS added: Qwen2.5 has no BOS, and chat markers are already in the text.
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int32)


def text_samples(doc: TextDoc, tokenizer, max_seq_len: int) -> list[Sample]:
    """One sample per window of at most `max_seq_len` tokens (non-overlapping)."""
    ids = _ids(tokenizer, doc.text)
    return [
        Sample(f"{doc.doc_id}#w{start // max_seq_len}", ids[start : start + max_seq_len], doc.source, doc.line_number)
        for start in range(0, len(ids), max_seq_len)
    ]


def render_chat(tokenizer, messages: list[dict[str, str]]) -> str:
    """The chat-templated text, cut after the assistant's content so it ends at the answer prefix."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return text[: text.rindex(END_OF_TURN)]


def arc_samples(task: ArcTask, tokenizer, max_seq_len: int) -> list[Sample | DeadLetter]:
    """One prompt per test input; a prompt longer than the window is a dead letter, never cut."""
    results: list[Sample | DeadLetter] = []
    for test_index in range(len(task.test)):
        ids = _ids(tokenizer, render_chat(tokenizer, prompt_messages(task, test_index)))
        if len(ids) > max_seq_len:
            results.append(DeadLetter(task.source, task.line_number, "tokenize", "too_long",
                                      f"test {test_index}: {len(ids)} tokens > max_seq_len {max_seq_len}"))
            continue
        augmentation = json.dumps({"test_index": test_index})
        results.append(Sample(f"{task.task_id}#t{test_index}", ids, task.source, task.line_number,
                              task_id=task.task_id, augmentation=augmentation))
    return results


def to_samples(record: TextDoc | ArcTask, tokenizer, max_seq_len: int) -> list[Sample | DeadLetter]:
    try:
        if isinstance(record, ArcTask):
            return arc_samples(record, tokenizer, max_seq_len)
        return text_samples(record, tokenizer, max_seq_len)
    except Exception as error:  # a tokenizer failure on one record must not stop the job
        return [DeadLetter(record.source, record.line_number, "tokenize", "tokenizer_error", repr(error)[:500])]
