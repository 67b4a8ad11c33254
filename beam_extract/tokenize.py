"""Records -> token-id samples: text split into windows, ARC views rendered into fitted prompts."""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import json
import weakref
from pathlib import Path

import numpy as np
import tokenizers
import transformers

from beam_extract.arc.augment import ArcView
from beam_extract.arc.encoders import Encoder
from beam_extract.arc.prompt import PromptTemplate, PromptTooLong, build_prompts
from beam_extract.model.weights import CheckpointError
from beam_extract.records.dead_letter import DeadLetter
from beam_extract.records.text import TextDoc
from beam_extract.records.tokens import TokenDoc


@dataclasses.dataclass(frozen=True)
class Sample:
    sample_id: str  # unique and deterministic: the same input and options give the same id
    token_ids: np.ndarray  # int32 [n]
    source: str
    line_number: int
    task_id: str = ""
    doc_id: str = ""  # text: the document's own id field
    augmentation: str = ""  # JSON: the ARC view's parameters and how its prompt was fitted
    train_dropped: int = 0  # ARC train examples dropped to fit max_seq_len
    stored: np.ndarray | None = None  # indices of the tokens whose activations are stored (None: all)


def sample_digest(sample: Sample) -> str:
    """What the model saw and what is stored of it: a resumed run skips a committed sample only if
    the same id still has the same digest."""
    stored = b"" if sample.stored is None else np.asarray(sample.stored, np.int32).tobytes()
    return hashlib.sha256(np.asarray(sample.token_ids, np.int32).tobytes() + b"|" + stored).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class PromptSettings:
    template: PromptTemplate
    encoder_name: str
    encoder: Encoder
    include_answer: bool
    date: datetime.datetime | None = None  # what the chat template's clock reads: the run's creation


@dataclasses.dataclass(frozen=True)
class TokenSelection:
    """Which tokens of a sample are stored: a position slice, minus excluded special tokens, and for
    ARC optionally only the test part (test input and answer)."""

    excluded_ids: frozenset[int] = frozenset()
    positions: slice = dataclasses.field(default_factory=lambda: slice(None))
    arc_test_only: bool = False

    def indices(self, token_ids: np.ndarray, test_start: int = 0) -> np.ndarray | None:
        keep = np.zeros(len(token_ids), bool)
        keep[self.positions] = True
        if self.excluded_ids:
            keep &= ~np.isin(token_ids, list(self.excluded_ids))
        if self.arc_test_only:
            keep[:test_start] = False
        return None if keep.all() else np.flatnonzero(keep).astype(np.int32)


def parse_positions(spec: str) -> slice:
    """A Python-style slice of token positions: `-64:`, `:128`, `10:20`, `::2`."""
    parts = spec.split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        positions = slice(*(int(p) if p.strip() else None for p in parts))
    except ValueError:
        raise ValueError(f"--positions {spec!r}: expected a slice like -64: or 0:128") from None
    if positions.step is not None and positions.step < 1:
        raise ValueError(f"--positions {spec!r}: the step must be at least 1")
    return positions


def special_token_ids(tokenizer) -> frozenset[int]:
    """The tokenizer's own special tokens: its BOS, EOS, pad and every added token it marks special
    (chat markers such as Qwen's <|im_start|>, Llama 3's <|start_header_id|>, Gemma's
    <start_of_turn>); added tokens it does not mark special (Qwen's <tool_call>) are text."""
    marked = {index for index, token in tokenizer.added_tokens_decoder.items() if token.special}
    return frozenset(marked | set(tokenizer.all_special_ids))


def select(sample: Sample, selection: TokenSelection, test_start: int = 0) -> Sample | DeadLetter:
    stored = selection.indices(sample.token_ids, test_start)
    if stored is not None and not len(stored):
        return DeadLetter(sample.source, sample.line_number, "tokenize", "no_tokens_selected",
                          f"{sample.sample_id}: --positions and token exclusions leave no token")
    return dataclasses.replace(sample, stored=stored)


def load_tokenizer(model_dir: str | Path) -> transformers.PreTrainedTokenizerBase:
    """The model directory's own tokenizer and chat template: loaded once per process for the same
    files (2 CPU-s for Qwen2's; the driver's checks and an in-process runner's workers share it)."""
    files = sorted(Path(model_dir).iterdir())
    names = {path.name for path in files}
    if "tokenizer_config.json" not in names or not ("tokenizer.json" in names or {"vocab.json", "merges.txt"} <= names):
        raise CheckpointError(f"{model_dir} has no tokenizer: a --model directory needs tokenizer.json (or vocab.json "
                              "and merges.txt) and tokenizer_config.json, with its chat template there or in "
                              "chat_template.jinja, beside config.json and the safetensors weights")
    return _load_tokenizer(str(model_dir), tuple((path.name, path.stat().st_size, path.stat().st_mtime_ns)
                                                  for path in files if path.is_file()))


@functools.lru_cache(maxsize=4)
def _load_tokenizer(model_dir: str, files: tuple) -> transformers.PreTrainedTokenizerBase:
    """`files` (names, sizes, modification times) keys the cache: a changed file is loaded anew."""
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except Exception as error:  # a truncated or malformed file: the tokenizers library raises plain Exceptions
        raise CheckpointError(f"{model_dir}: its tokenizer cannot be loaded ({type(error).__name__}: "
                              f"{' '.join(str(error).split())[:300]})") from None
    # Shared by threads, it must not change: every call of ours would clear a tokenizer.json's own
    # truncation and padding before encoding (and change the tokenizer while another thread reads it).
    tokenizer.backend_tokenizer.no_truncation()
    tokenizer.backend_tokenizer.no_padding()
    return tokenizer


# Long documents are tokenized in pieces of about this many characters, a batch of pieces at a
# time: a fast tokenizer holds ~150 bytes per character of its input while it works.
CHUNK_CHARS = 1 << 16
PIECES_AT_ONCE = 8
# Longest stretch of text with no safe cut (a run of letters of a script written without spaces,
# of spaces or of punctuation; with a tokenizer that cuts nowhere, the whole document) tokenized:
# such a stretch is one pre-token, which Qwen2's BPE holds at ~300 bytes a character (8M CJK
# characters took 3.3 GB and 44 s). A longer one is a `run_too_long` dead letter.
MAX_UNCUT_CHARS = 1 << 20


class RunTooLong(ValueError):
    """A stretch of text longer than MAX_UNCUT_CHARS that the tokenizer cannot be cut inside."""


def cut_after_word(text: str, at: int) -> bool:
    """Where Qwen2's pre-tokenizer ends a pre-token whatever follows: after a letter or digit (a run
    of letters, or a digit, which is a pre-token of its own), when a space or a digit comes next.
    Cut there, a piece's last pre-token needs no look past the cut (unlike whitespace, whose
    pre-tokens depend on what follows), so the pieces' tokens are the whole text's; NFC composes
    nothing across a space or a digit."""
    return text[at - 1].isalnum() and (text[at] == " " or text[at].isdecimal())


def cut_at_line_start(text: str, at: int) -> bool:
    """Before a letter that starts a line: where byte-level BPE pre-tokenizers that group digits
    (Llama 3's, GPT-2's) end the newlines' pre-token whatever follows."""
    return text[at - 1] == "\n" and text[at].isalpha()


# Tried in order on each tokenizer: the first under which its pieces give the whole text's tokens.
CUT_RULES = (cut_after_word, cut_at_line_start)
# What a cut could break: digit runs next to letters, spaces and tabs before words, punctuation
# ending a line, blank lines, indentation, composed and decomposed letters, contractions.
_PROBE = ("Tokens 12345 and x9876y 1 2 3.\nNext line's 42nd item\n\nAnother  paragraph,\twith  spaces.\n"
          "  Indented 007\nÉté 2024: café, e\u0301clair, 日本語 テキスト\n--- list:\n- item1\nend")


def pieces(text: str, size: int = CHUNK_CHARS, cut=cut_after_word, longest: int = MAX_UNCUT_CHARS) -> list[str]:
    """`text` cut where `cut` allows (None: nowhere), about every `size` characters. A stretch with
    no such place (a run of letters in a script written without spaces) stays whole, up to
    `longest` characters: past that, RunTooLong, found without reading further."""
    if cut is None:
        if len(text) > longest:
            raise RunTooLong(f"{len(text)} characters: this tokenizer is never cut inside a document, over {longest}")
        return [text]
    cuts, at = [0], size
    while at < len(text):
        scanned_from = at
        while at < len(text) and not cut(text, at):
            at += 1
            if at - cuts[-1] > longest:  # the run may begin after a place the jump by `size` passed
                cuts.append(_last_cut(text, cut, cuts[-1], scanned_from, longest))
        if at >= len(text):
            break
        cuts.append(at)
        at += size
    return [text[a:b] for a, b in zip(cuts, cuts[1:] + [len(text)])]


def _last_cut(text: str, cut, after: int, before: int, longest: int) -> int:
    """The last place `cut` allows strictly between `after` and `before`; RunTooLong if none."""
    found = next((at for at in range(before - 1, after, -1) if cut(text, at)), None)
    if found is None:
        raise RunTooLong(f"over {longest} characters from character {after} have no place where this tokenizer "
                         "can be cut")
    return found


def _batches(parts: list[str], chars: int = PIECES_AT_ONCE * CHUNK_CHARS) -> list[list[str]]:
    """Consecutive pieces, grouped so that a group holds at most `chars` characters (or one piece)."""
    groups: list[list[str]] = []
    size = 0
    for part in parts:
        if not groups or size + len(part) > chars:
            groups.append([])
            size = 0
        groups[-1].append(part)
        size += len(part)
    return groups


_PLAIN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _plain_tokenizer(tokenizer) -> tokenizers.Tokenizer:
    """The tokenizer without its added tokens: text is tokenized by its vocabulary alone, so
    markers written in a document (`<|im_end|>`, `<tool_call>`) are characters, whether the
    tokenizer calls them special or not."""
    if tokenizer not in _PLAIN:
        # Its own vocabulary model, shared (not a copy through JSON: 2 CPU-s for Qwen2's 150k
        # tokens), and its steps; no truncation or padding, which would change a document's tokens.
        backend = tokenizer.backend_tokenizer
        plain = tokenizers.Tokenizer(backend.model)
        for step in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
            if getattr(backend, step) is not None:
                setattr(plain, step, getattr(backend, step))
        _PLAIN[tokenizer] = plain
    return _PLAIN[tokenizer]


def _encode(tokenizer, texts: list[str], markers_as_text: bool) -> list[list[int]]:
    if not markers_as_text:
        return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    return [encoding.ids for encoding in _plain_tokenizer(tokenizer).encode_batch(texts, add_special_tokens=False)]


def safe_cut(tokenizer, markers_as_text: bool = True):
    """The first of CUT_RULES under which this tokenizer gives a probe text's tokens when the text
    is cut at every place the rule allows, or None: such a tokenizer (one that prepends a `▁` to
    every text, as Mistral's and Llama 2's do) tokenizes a document whole."""
    found = _CUTS.setdefault(tokenizer, {})
    if markers_as_text not in found:
        whole = _encode(tokenizer, [_PROBE], markers_as_text)[0]
        found[markers_as_text] = next(
            (rule for rule in CUT_RULES
             if sum(_encode(tokenizer, pieces(_PROBE, 1, rule), markers_as_text), []) == whole), None)
    return found[markers_as_text]


def text_token_ids(tokenizer, text: str, markers_as_text: bool = True) -> np.ndarray:
    """A document's tokens, tokenized piece by piece where the tokenizer allows it (`safe_cut`:
    the tokenizer's memory bounded by PIECES_AT_ONCE * CHUNK_CHARS and MAX_UNCUT_CHARS, not by the
    document; RunTooLong past the latter). Markers written in it are characters like any others
    unless `markers_as_text` is off (the first release's behaviour): only the chat template
    inserts control tokens."""
    groups = _batches(pieces(text, cut=safe_cut(tokenizer, markers_as_text)))
    # Each group's ids become int32 at once: a Python list holds ~40 bytes a token, this 4.
    return np.concatenate([np.zeros(0, np.int32)] + [np.asarray(ids, np.int32) for group in groups
                                                     for ids in _encode(tokenizer, group, markers_as_text)])


_AFFIXES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def special_affixes(tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """The ids the tokenizer itself puts before and after a text: a BOS for Llama 3 and Gemma,
    nothing for Qwen."""
    if tokenizer not in _AFFIXES:
        bare = tokenizer("a", add_special_tokens=False)["input_ids"]
        full = tokenizer("a", add_special_tokens=True)["input_ids"]
        at = next((i for i in range(len(full) - len(bare) + 1) if full[i: i + len(bare)] == bare), None)
        if at is None:
            raise ValueError("the tokenizer tokenizes a text differently with its special tokens: cannot tell them apart")
        _AFFIXES[tokenizer] = np.asarray(full[:at], np.int32), np.asarray(full[at + len(bare):], np.int32)
    return _AFFIXES[tokenizer]


def text_samples(doc: TextDoc, tokenizer, max_seq_len: int, selection: TokenSelection,
                 markers_as_text: bool = True) -> list[Sample | DeadLetter]:
    """One sample per window of at most `max_seq_len` tokens (non-overlapping), each framed as the
    tokenizer frames a text: with its BOS (every window, so that none starts without one) and its
    EOS (the last window)."""
    try:
        ids = text_token_ids(tokenizer, doc.text, markers_as_text)
    except RunTooLong as error:
        return [DeadLetter(doc.source, doc.line_number, "tokenize", "run_too_long", str(error))]
    prefix, suffix = special_affixes(tokenizer)
    room = max_seq_len - len(prefix) - len(suffix)
    starts = range(0, len(ids), room)
    return [
        select(Sample(f"{doc.key}#w{window}",
                      np.concatenate([prefix, ids[start: start + room], suffix if start == starts[-1] else suffix[:0]]),
                      doc.source, doc.line_number, doc_id=doc.doc_id), selection)
        for window, start in enumerate(starts)
    ]


def token_samples(doc: TokenDoc, tokenizer, max_seq_len: int, selection: TokenSelection, vocab_size: int | None,
                  prepend_bos: bool = False) -> list[Sample | DeadLetter]:
    """A pre-tokenized row's windows of at most `max_seq_len` ids, as given (no tokenizer runs):
    with `prepend_bos` each window starts with the tokenizer's own text prefix, as text windows do.
    An id that is no row of the model's embedding (or of any int32) makes the row a dead letter."""
    bound = vocab_size or 2**31
    # Checked on the Python ints: an id past int64 (2**64 - 1 in a uint64 column) is out of range too.
    bad = next((i for i in doc.token_ids if not 0 <= i < bound), None)
    if bad is not None:
        return [DeadLetter(doc.source, doc.line_number, "tokenize", "token_out_of_range",
                           f"{doc.key}: token id {bad} has no row in the model's embedding of {bound} rows")]
    ids = np.asarray(doc.token_ids, np.int64)
    prefix = special_affixes(tokenizer)[0] if prepend_bos else np.zeros(0, np.int32)
    room = max_seq_len - len(prefix)
    return [select(Sample(f"{doc.key}#w{window}", np.concatenate([prefix, ids[start: start + room].astype(np.int32)]),
                          doc.source, doc.line_number, doc_id=doc.doc_id), selection)
            for window, start in enumerate(range(0, len(ids), room))]


def arc_samples(view: ArcView, tokenizer, settings: PromptSettings, max_seq_len: int,
                selection: TokenSelection) -> list[Sample | DeadLetter]:
    """One sample per test input of the view; a prompt that cannot fit is a `too_long` dead letter."""
    task, results = view.task, []
    if not tokenizer.chat_template:  # base checkpoints (GPT-2, Mistral-7B-v0.1): text only
        return [DeadLetter(task.source, task.line_number, "tokenize", "no_chat_template",
                           "the model's tokenizer has no chat template (tokenizer_config.json's chat_template or "
                           "chat_template.jinja), which ARC prompts are rendered with; text documents need none")]
    for prompt in build_prompts(task, tokenizer, settings.template, settings.encoder, max_seq_len,
                                settings.include_answer, settings.date):
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
        sample = Sample(f"{task.task_id}/v{view.params.view}/t{prompt.test_index}", prompt.token_ids,
                        task.source, task.line_number, task_id=task.task_id,
                        augmentation=json.dumps(augmentation, sort_keys=True), train_dropped=prompt.train_dropped)
        results.append(select(sample, selection, prompt.test_start))
    return results


def within_vocabulary(result: Sample | DeadLetter, vocab_size: int) -> Sample | DeadLetter:
    """A token id past the model's embedding would silently read its last row (a gather clamps on
    accelerators): such a sample is a dead letter naming the id."""
    if isinstance(result, Sample) and len(result.token_ids) and int(result.token_ids.max()) >= vocab_size:
        return DeadLetter(result.source, result.line_number, "tokenize", "token_out_of_range",
                          f"{result.sample_id}: token id {int(result.token_ids.max())} has no row in the model's "
                          f"embedding of {vocab_size} rows")
    return result


def to_samples(record: TextDoc | TokenDoc | ArcView, tokenizer, settings: PromptSettings, max_seq_len: int,
               selection: TokenSelection, markers_as_text: bool = True,
               vocab_size: int | None = None, prepend_bos: bool = False) -> list[Sample | DeadLetter]:
    """A record's samples, or dead letters that carry its raw line and id."""
    source = record.task if isinstance(record, ArcView) else record
    try:
        if isinstance(record, ArcView):
            results = arc_samples(record, tokenizer, settings, max_seq_len, selection)
        elif isinstance(record, TokenDoc):
            results = token_samples(record, tokenizer, max_seq_len, selection, vocab_size, prepend_bos)
        else:
            results = text_samples(record, tokenizer, max_seq_len, selection, markers_as_text)
        results = [within_vocabulary(r, vocab_size) for r in results] if vocab_size else results
    except Exception as error:  # a tokenizer failure on one record must not stop the job
        results = [DeadLetter(record.source, record.line_number, "tokenize", "tokenizer_error", repr(error)[:500])]
    record_id = source.task_id if isinstance(record, ArcView) else source.key
    return [dataclasses.replace(r, raw=source.raw, record_id=r.record_id or record_id) if isinstance(r, DeadLetter)
            else r for r in results]
