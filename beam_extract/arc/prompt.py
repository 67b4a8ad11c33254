"""ARC task -> chat prompts that end at the answer prefix, fitted to the token budget.

A prompt template is a Jinja2 file with three blocks, `system`, `user` and `assistant`, rendered
with: `train_pairs` (list of {input, output}, encoded grids), `test_input` (encoded grid) and
`answer` (the encoded test output for a train prompt, else the answer prefix "```grid"). The
model's chat template turns the three messages into text, which is cut after the assistant's
content so it ends at the answer, with no end-of-turn marker.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import operator
import re
import threading
from importlib import resources
from pathlib import Path

import numpy as np
from jinja2 import StrictUndefined, TemplateError, nodes
from jinja2.compiler import CodeGenerator
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from beam_extract.arc.encoders import Encoder
from beam_extract.records.arc import ArcTask

BUILTIN_TEMPLATES = ("output-from-examples-v0", "output-from-examples-v1")
DEFAULT_TEMPLATE = "output-from-examples-v1"
ANSWER_PREFIX = "```grid"
BLOCKS = ("system", "user", "assistant")

# A rendered prompt longer than this is refused: far past any context window, and a bound on what a
# template can make a worker allocate.
MAX_PROMPT_CHARS = 4 << 20
MAX_EXPONENT = 64
MAX_TEMPLATE_BYTES = 1 << 20
# Work one render may do: characters and items (nested lists counted through) that its expressions
# make, compare, slice, print or pass to a filter, test or method. Each operation is charged before
# it runs, so `{{ [[0]*4000000]*4000000 }}` or a loop comparing two long lists stops at once.
MAX_RENDER_WORK = 1 << 24
# Methods of strings whose arguments set how much they allocate (a width, a count, a replacement).
_SIZED_METHODS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs", "format", "format_map", "replace",
                            "join", "translate"})
_COMPARISONS = {"eq": operator.eq, "ne": operator.ne, "gt": operator.gt, "gteq": operator.ge, "lt": operator.lt,
                "lteq": operator.le, "in": lambda a, b: a in b, "notin": lambda a, b: a not in b}
_work = threading.local()  # .left: what the render in progress in this thread may still do
_END = object()


def _weight(value, budget: int) -> int:
    """Characters of strings and items of lists, tuples and dicts in `value`, nested ones counted
    through (a list holding one list a million times weighs a million of them), counted only up to
    just past `budget`: the count costs at most that much (plus one step per number in it)."""
    total, stack = 0, [iter((value,))]
    while stack and total <= budget:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, str):
            total += len(item)
        elif isinstance(item, dict):
            total += len(item)
            stack.append(iter(item.items()))
        elif isinstance(item, (list, tuple)):
            total += len(item)
            kinds = set(map(type, item))  # in C: a list of a million numbers costs milliseconds
            if all(issubclass(kind, str) for kind in kinds):
                total += sum(map(len, item))
            elif any(issubclass(kind, (list, tuple, dict)) for kind in kinds):
                stack.append(iter(item))
    return total


def _spend(items: int) -> None:
    """Counts `items` of work against the render's MAX_RENDER_WORK (nothing outside a render:
    constant folding at load only sees the template's own literals)."""
    left = getattr(_work, "left", None)
    if left is None:
        return
    if items > left:
        raise SecurityError(f"the template does over {MAX_RENDER_WORK} items' work in one render")
    _work.left = left - items


def _charge(*values) -> None:
    """Charges the weight of `values` (at least one item each), stopping as soon as it is too much."""
    for value in values:
        left = getattr(_work, "left", None)
        if left is None:
            return
        _spend(max(1, _weight(value, left)))


def _charged(function):
    """A filter or test that first charges its arguments' weight."""
    @functools.wraps(function)  # keeps Jinja's pass_context/pass_environment marks
    def charged(*args, **kwargs):
        _charge(*args, *kwargs.values())
        return function(*args, **kwargs)
    return charged


class _ChargedCode(CodeGenerator):
    """Comparisons (`==`, `<`, `in`, chained) and slices go through the environment, which charges
    them (Jinja writes both as plain Python): two long lists compare in time proportional to their
    length, and a slice copies its items."""

    def visit_Getitem(self, node: nodes.Getitem, frame) -> None:
        if not isinstance(node.arg, nodes.Slice):
            super().visit_Getitem(node, frame)
            return
        self.write("environment.getitem(")
        self.visit(node.node, frame)
        self.write(", slice(")
        for at, part in enumerate((node.arg.start, node.arg.stop, node.arg.step)):
            self.write(", " if at else "")
            if part is None:
                self.write("None")
            else:
                self.visit(part, frame)
        self.write("))")

    def visit_Compare(self, node: nodes.Compare, frame) -> None:
        self.write("environment.compare(")
        self.visit(node.expr, frame)
        for operand in node.ops:
            self.write(f", {operand.op!r}, ")
            self.visit(operand.expr, frame)
        self.write(")")


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox (no Python objects, no file system), with bounded sizes. The
    sandbox does not fold intercepted operators into constants at compile time, so `'a' * 10**10`
    is checked here when rendered instead of being built while the template loads."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _ChargedCode

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(right, int) and abs(right) > MAX_EXPONENT:
            raise SecurityError(f"exponent {right} is over {MAX_EXPONENT}")
        if operator == "%" and isinstance(left, str):
            raise SecurityError("printf-style formatting (a width can be any size) is not available")
        if operator in ("*", "+"):
            # Sizes count nested items: `[[0]*4000000]*4000000` is 16e12 items, not 4e6.
            sizes = [_weight(v, MAX_PROMPT_CHARS) if isinstance(v, (str, list, tuple)) else None for v in (left, right)]
            if operator == "*" and None in sizes and sizes != [None, None]:
                count = right if sizes[0] is not None else left
                size = (sizes[0] or sizes[1]) * (count if isinstance(count, int) else 0)
            else:
                size = sum(n or 0 for n in sizes)
            if size > MAX_PROMPT_CHARS:
                raise SecurityError(f"an expression would make {size} items, over {MAX_PROMPT_CHARS}")
            _spend(size)
        return super().call_binop(context, operator, left, right)

    def call(self, context, obj, *args, **kwargs):
        method = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format
        if isinstance(getattr(method, "__self__", None), str) and getattr(method, "__name__", "") in _SIZED_METHODS:
            raise SecurityError(f"str.{method.__name__} is not available in prompt templates")
        _charge(getattr(method, "__self__", None), *args, *kwargs.values())
        return super().call(context, obj, *args, **kwargs)

    def getitem(self, obj, argument):
        if isinstance(argument, slice) and hasattr(obj, "__len__"):
            _spend(len(range(*argument.indices(len(obj)))))  # a slice copies its items
        return super().getitem(obj, argument)

    def compare(self, left, *operations):
        """A (chained) comparison, charged the weight of its operands first."""
        _charge(left, *operations[1::2])
        for op, right in zip(operations[::2], operations[1::2]):
            if not _COMPARISONS[op](left, right):
                return False
            left = right
        return True


_ENVIRONMENT = _BoundedSandbox(undefined=StrictUndefined, keep_trailing_newline=True, trim_blocks=True,
                               autoescape=False, finalize=lambda value: (_charge(value), value)[1])
# Filters that cannot make their output much larger than their input (no join, replace, center,
# indent, format: their size is set by an argument), charged their input.
_ENVIRONMENT.filters = {name: _charged(_ENVIRONMENT.filters[name]) for name in (
    "length", "count", "upper", "lower", "title", "capitalize", "trim", "default", "d", "string", "int", "float",
    "abs", "round", "first", "last", "list", "reverse", "sort", "unique", "min", "max", "sum", "e", "escape",
    "safe", "tojson", "wordcount")}
_ENVIRONMENT.tests = {name: _charged(test) for name, test in _ENVIRONMENT.tests.items()}
del _ENVIRONMENT.globals["lipsum"]  # lipsum(n) writes n paragraphs, however many n says


def _refuse_unbounded(source: str, name: str) -> None:
    """Constructs whose cost a template file could make unbounded: macros and call blocks (recursion),
    `~` (unchecked concatenation), namespaces (state across loop iterations), loops inside loops
    and recursive loops (time without output), filter blocks."""
    ast = _ENVIRONMENT.parse(source)
    for kind in (nodes.Macro, nodes.CallBlock, nodes.FilterBlock, nodes.Concat, nodes.NSRef):
        found = next(ast.find_all(kind), None)
        if found is not None:
            raise ValueError(f"prompt template {name!r}: {kind.__name__} (line {found.lineno}) is not available in "
                             "prompt templates")
    for loop in ast.find_all(nodes.For):
        inner = any(isinstance(node, nodes.For) or next(node.find_all(nodes.For), None) is not None
                    for node in loop.body + loop.else_)
        if loop.recursive or inner:
            raise ValueError(f"prompt template {name!r}: a loop inside a loop or a recursive loop (line "
                             f"{loop.lineno}) is not available in prompt templates")


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    name: str
    source: str

    def render(self, train_pairs: list[dict[str, str]], test_input: str, answer: str) -> list[dict[str, str]]:
        template = _ENVIRONMENT.from_string(self.source)
        context = template.new_context({"train_pairs": train_pairs, "test_input": test_input, "answer": answer})
        messages, size = [], 0
        _work.left = MAX_RENDER_WORK
        try:
            for block in BLOCKS:
                parts = []
                for part in template.blocks[block](context):  # stops as soon as the prompt is too long
                    size += len(part)
                    if size > MAX_PROMPT_CHARS:
                        raise ValueError(f"prompt template {self.name!r} renders over {MAX_PROMPT_CHARS} characters")
                    parts.append(part)
                messages.append({"role": block, "content": "".join(parts)})
        finally:
            _work.left = None
        return messages


def load_template(name_or_path: str) -> PromptTemplate:
    """A built-in template by name, or a user's template file by path."""
    if name_or_path in BUILTIN_TEMPLATES:
        source = resources.files("beam_extract").joinpath("data", "prompts", f"{name_or_path}.jinja").read_text("utf-8")
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise ValueError(f"prompt template {name_or_path!r} is neither built in "
                             f"({', '.join(BUILTIN_TEMPLATES)}) nor a file")
        if path.stat().st_size > MAX_TEMPLATE_BYTES:
            raise ValueError(f"prompt template {name_or_path!r} is over {MAX_TEMPLATE_BYTES} bytes")
        try:
            source = path.read_text("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"prompt template {name_or_path!r} is not UTF-8 (byte {error.start})") from None
    try:
        _refuse_unbounded(source, name_or_path)
        blocks = _ENVIRONMENT.from_string(source).blocks
    except TemplateError as error:
        raise ValueError(f"prompt template {name_or_path!r}: {error}") from None
    missing = [block for block in BLOCKS if block not in blocks]
    if missing:
        raise ValueError(f"prompt template {name_or_path!r} lacks the block(s) {', '.join(missing)}")
    return PromptTemplate(name_or_path, source)


_DATE_FORMAT = re.compile(r"""strftime_now\(\s*(?:'([^'\\]*)'|"([^"\\]*)")\s*\)""")
_DATES = "beam_extract_dates"  # the render variable of the formats' values
# Shadows transformers' global `strftime_now` (which reads the clock) in the template itself: render
# variables are plain data (transformers rebuilds them as JSON types), so the date comes formatted.
_FIXED_CLOCK = ("{% macro strftime_now(format) %}{% if format is string and format in " + _DATES + " %}{{ "
                + _DATES + "[format] }}{% else %}{{ raise_exception('the chat template reads the date (strftime_now) "
                "with a format not written as a literal, or no run date was given') }}{% endif %}{% endmacro %}")


def with_fixed_clock(tokenizer, date: datetime.datetime | None) -> dict:
    """apply_chat_template's arguments that make the chat template's `strftime_now` (Llama 3's "Today
    Date") read `date` (the run's creation), never the clock: a prompt renders the same on every
    worker and day of a run. Its formats are the literal ones the template names; with no date, or
    another format, the render fails (a dead letter) rather than read the clock."""
    source = tokenizer.get_chat_template()
    if "strftime_now" not in source:
        return {}
    formats = {a or b for a, b in _DATE_FORMAT.findall(source)}
    return {"chat_template": _FIXED_CLOCK + source,
            _DATES: {} if date is None else {f: date.strftime(f) for f in formats}}


def render_chat(tokenizer, messages: list[dict[str, str]], date: datetime.datetime | None = None) -> str:
    """The model's own chat template applied, the text ending at the assistant's content (its
    answer prefix, no end-of-turn marker: transformers' `continue_final_message`). A template that
    refuses a system turn (Gemma 2's raises) gets the system text at the head of the user's, as
    Gemma 3's template does by itself. The template's clock reads `date` (the run's creation)."""
    clock = with_fixed_clock(tokenizer, date)
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True, **clock)
    except TemplateError:
        if messages[0]["role"] != "system":
            raise
        system, user, *rest = messages
        merged = [{"role": "user", "content": f"{system['content']}\n\n{user['content']}"}, *rest]
        text = tokenizer.apply_chat_template(merged, tokenize=False, continue_final_message=True, **clock)
    if len(text) > 2 * MAX_PROMPT_CHARS:  # the model's own chat template, rendered by transformers
        raise ValueError(f"the model's chat template renders {len(text)} characters, over {2 * MAX_PROMPT_CHARS}")
    return text


@dataclasses.dataclass(frozen=True)
class Prompt:
    test_index: int
    text: str
    token_ids: np.ndarray  # int32
    train_dropped: int  # train examples dropped from the end to fit max_seq_len
    test_start: int  # index of the first token of the test input: the test part runs from here to the end


@dataclasses.dataclass(frozen=True)
class PromptTooLong:
    test_index: int
    tokens_with_one_example: int


def _test_start(tokenizer, text: str, messages: list[dict[str, str]], encoded_input: str) -> int:
    """The token where the test input begins: its last occurrence before the assistant's answer."""
    answer_at = text.rindex(messages[-1]["content"].strip())
    char = text.rindex(encoded_input, 0, answer_at) if encoded_input in text[:answer_at] else answer_at
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return next(i for i, (_, end) in enumerate(offsets) if end > char)


def token_ids(tokenizer, text: str) -> np.ndarray:
    # The chat template wrote the markers (and a BOS where the model has one), so they are control
    # tokens here, and the tokenizer adds nothing of its own.
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int32)


def build_prompts(task: ArcTask, tokenizer, template: PromptTemplate, encoder: Encoder, max_seq_len: int,
                  include_answer: bool = False, date: datetime.datetime | None = None) -> list[Prompt | PromptTooLong]:
    """One prompt per test input. Over-long prompts drop train examples from the end until they fit;
    the test input and the answer prefix are never cut. A prompt grows with every train example it
    keeps, so the most that fit are found by bisection: log2(train examples) renders, not one per
    example dropped."""
    pairs = [{"input": encoder.encode(i), "output": encoder.encode(o)} for i, o in task.train]
    results: list[Prompt | PromptTooLong] = []
    for test_index, (test_input, test_output) in enumerate(task.test):
        answer = encoder.encode(test_output) if include_answer and test_output is not None else ANSWER_PREFIX
        encoded_input = encoder.encode(test_input)
        lengths: dict[int, int] = {}

        def fitted(kept: int) -> tuple | None:
            """(kept, messages, text, ids) if the prompt with `kept` train examples fits."""
            messages = template.render(pairs[:kept], encoded_input, answer)
            text = render_chat(tokenizer, messages, date)
            ids = token_ids(tokenizer, text)
            lengths[kept] = len(ids)
            return (kept, messages, text, ids) if len(ids) <= max_seq_len else None

        best = fitted(len(pairs))
        low, high = (1, len(pairs) - 1) if best is None else (1, 0)
        while low <= high:  # the most train examples that fit, if any, lie in low..high
            middle = (low + high) // 2
            if (candidate := fitted(middle)) is not None:
                best, low = candidate, middle + 1
            else:
                high = middle - 1
        if best is None:  # the search ended on one train example: its length says by how much
            results.append(PromptTooLong(test_index, lengths[1]))
            continue
        kept, messages, text, ids = best
        results.append(Prompt(test_index, text, ids, len(pairs) - kept,
                              _test_start(tokenizer, text, messages, encoded_input)))
    return results
