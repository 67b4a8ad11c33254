"""Records -> token-id samples: text split into windows, ARC views rendered into fitted prompts."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import transformers

from beam_extract.arc.augment import ArcView
from beam_extract.arc.encoders import Encoder
from beam_extract.arc.prompt import PromptTemplate, PromptTooLong, build_prompts, token_ids
from beam_extract.records.dead_letter import DeadLetter
from beam_extract.records.text import TextDoc


@dataclasses.dataclass(frozen=True)
class Sample:
    sample_id: str  # unique and deterministic: the same input and options give the same id
    token_ids: np.ndarray  # int32 [n]
    source: str
    line_number: int
    task_id: str = ""
    augmentation: str = ""  # JSON: the ARC view's parameters and how its prompt was fitted
    train_dropped: int = 0  # ARC train examples dropped to fit max_seq_len


@dataclasses.dataclass(frozen=True)
class PromptSettings:
    template: PromptTemplate
    encoder_name: str
    encoder: Encoder
    include_answer: bool


def load_tokenizer(model_dir: str | Path) -> transformers.PreTrainedTokenizerBase:
    return transformers.AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)


def text_samples(doc: TextDoc, tokenizer, max_seq_len: int) -> list[Sample]:
    """One sample per window of at most `max_seq_len` tokens (non-overlapping)."""
    ids = token_ids(tokenizer, doc.text)
    return [
        Sample(f"{doc.doc_id}#w{start // max_seq_len}", ids[start : start + max_seq_len], doc.source, doc.line_number)
        for start in range(0, len(ids), max_seq_len)
    ]


def arc_samples(view: ArcView, tokenizer, settings: PromptSettings, max_seq_len: int) -> list[Sample | DeadLetter]:
    """One sample per test input of the view; a prompt that cannot fit is a `too_long` dead letter."""
    task, results = view.task, []
    for prompt in build_prompts(task, tokenizer, settings.template, settings.encoder, max_seq_len,
                                settings.include_answer):
        if isinstance(prompt, PromptTooLong):
            results.append(DeadLetter(task.source, task.line_number, "tokenize", "too_long",
                                      f"view {view.params.view} test {prompt.test_index}: "
                                      f"{prompt.tokens_with_one_example} tokens with one train example "
                                      f"> max_seq_len {max_seq_len}"))
            continue
        augmentation = view.params.as_dict() | {
            "test_index": prompt.test_index, "train_dropped": prompt.train_dropped,
            "prompt_template": settings.template.name, "grid_encoder": settings.encoder_name,
            "include_answer": settings.include_answer,
        }
        results.append(Sample(f"{task.task_id}/v{view.params.view}/t{prompt.test_index}", prompt.token_ids,
                              task.source, task.line_number, task_id=task.task_id,
                              augmentation=json.dumps(augmentation, sort_keys=True),
                              train_dropped=prompt.train_dropped))
    return results


def to_samples(record: TextDoc | ArcView, tokenizer, settings: PromptSettings,
               max_seq_len: int) -> list[Sample | DeadLetter]:
    try:
        if isinstance(record, ArcView):
            return arc_samples(record, tokenizer, settings, max_seq_len)
        return text_samples(record, tokenizer, max_seq_len)
    except Exception as error:  # a tokenizer failure on one record must not stop the job
        return [DeadLetter(record.source, record.line_number, "tokenize", "tokenizer_error", repr(error)[:500])]
