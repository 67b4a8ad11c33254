"""ARC: encoders, augmentation, prompts and fit-to-length (DESIGN section 4)."""

import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from beam_extract.arc import (DEFAULT_ENCODER, Prompt, PromptTooLong, augment, build_prompts, decode_grid,
                              encode_grid, load_template, parse_encoder, parse_task, transform_grid, undo_grid)
from beam_extract.arc.augment import GEOMETRIC, view_params
from beam_extract.model.weights import resolve_model_dir
from beam_extract.records.errors import InvalidRecord
from beam_extract.tokenize import load_tokenizer

GRID = ((1, 0, 0), (0, 1, 0))


@pytest.mark.parametrize("name, text", [
    ("MinimalGridEncoder()", "100\n010"),
    ("GridWithSeparationEncoder('|')", "1|0|0\n0|1|0"),
    ("GridCodeBlockEncoder(MinimalGridEncoder())", "```grid\n100\n010\n```"),
    ("GridShapeEncoder(MinimalGridEncoder())", "```grid shape: 2x3\n100\n010\n```"),
    ("RowNumberEncoder(MinimalGridEncoder())", "1 100\n2 010"),
    ("RepeatNumberEncoder(2)", "110000\n001100"),
    ("ReplaceNumberEncoder(MinimalGridEncoder())", "òññ\nñòñ"),
    (DEFAULT_ENCODER, "```grid shape: 2x3\n1 100\n2 010\n```"),
    ('RowNumberEncoder(GridWithSeparationEncoder(","))', "1 1,0,0\n2 0,1,0"),
])
def test_encoder_text(name, text):
    assert encode_grid(GRID, name) == text
    assert decode_grid(text, name) == GRID


ALL_ENCODERS = [
    "MinimalGridEncoder()", "GridWithSeparationEncoder('|')", "RepeatNumberEncoder(3)",
    "GridCodeBlockEncoder(MinimalGridEncoder())", "GridShapeEncoder(MinimalGridEncoder())",
    "RowNumberEncoder(MinimalGridEncoder())", "ReplaceNumberEncoder(MinimalGridEncoder())", DEFAULT_ENCODER,
    "GridCodeBlockEncoder(ReplaceNumberEncoder(RowNumberEncoder(GridWithSeparationEncoder('|'))))",
    "ReplaceNumberEncoder(GridShapeEncoder(RowNumberEncoder(RepeatNumberEncoder(2))))",
]
grids = st.integers(1, 30).flatmap(lambda rows: st.integers(1, 30).flatmap(
    lambda cols: st.lists(st.lists(st.integers(0, 9), min_size=cols, max_size=cols), min_size=rows, max_size=rows)))


@settings(max_examples=200, deadline=None)
@given(grid=grids, name=st.sampled_from(ALL_ENCODERS))
def test_decode_inverts_encode(grid, name):
    grid = tuple(tuple(row) for row in grid)
    assert decode_grid(encode_grid(grid, name), name) == grid


@pytest.mark.parametrize("bad", ["eval('1')", "MinimalGridEncoder", "RowNumberEncoder(3)", "Nope()",
                                 "MinimalGridEncoder() MinimalGridEncoder()", "GridWithSeparationEncoder(1)"])
def test_encoder_names_are_parsed_safely(bad):
    with pytest.raises(ValueError, match="encoder"):
        parse_encoder(bad)


ASYMMETRIC = ((1, 2, 3), (4, 5, 6))


def test_eight_distinct_transforms_each_undone():
    images = set()
    for view in range(8):
        params = view_params(0, "t", view, 1)
        assert (params.hflip, params.k) == GEOMETRIC[view]
        image = transform_grid(ASYMMETRIC, params)
        images.add(tuple(tuple(params.color_map.index(c) for c in row) for row in image))  # geometry only
        assert undo_grid(image, params) == ASYMMETRIC
    assert len(images) == 8


def test_geometry_matches_numpy_convention():
    params = view_params(0, "t", 5, 1)  # hflip, one counter-clockwise turn
    colors = np.asarray(params.color_map)
    expected = colors[np.rot90(np.fliplr(np.asarray(ASYMMETRIC)), 1)]
    assert transform_grid(ASYMMETRIC, params) == tuple(map(tuple, expected.tolist()))


def make_task(n_train=3, size=3, task_id="task-a", test_output=True):
    rng = np.random.default_rng(len(task_id) + n_train)

    def grid():
        return rng.integers(0, 10, (size, size)).tolist()

    obj = {"task_id": task_id, "train": [{"input": grid(), "output": grid()} for _ in range(n_train)],
           "test": [{"input": grid(), **({"output": grid()} if test_output else {})}]}
    return parse_task(obj)


def test_augmentation_applies_one_transform_to_every_grid_and_permutes_train():
    task = make_task(n_train=5)
    view, params = augment(task, seed=3, view=6)
    assert sorted(params.train_order) == list(range(5))
    for i, source in enumerate(params.train_order):
        assert view.train[i] == tuple(transform_grid(g, params) for g in task.train[source])
    assert view.test[0] == tuple(transform_grid(g, params) for g in task.test[0])


def test_same_seed_task_view_gives_identical_bytes_in_another_process():
    task = make_task()
    here = json.dumps([augment(task, 11, v)[1].as_dict() for v in range(8)])
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from test_arc import make_task; "
            "from beam_extract.arc import augment; "
            "print(json.dumps([augment(make_task(), 11, v)[1].as_dict() for v in range(8)]))")
    there = subprocess.run([sys.executable, "-c", code, str(__import__("pathlib").Path(__file__).parent)],
                           capture_output=True, text=True, check=True,
                           env={**__import__("os").environ, "PYTHONHASHSEED": "123"}).stdout.strip()
    assert here == there
    assert augment(task, 12, 0)[1] != augment(task, 11, 0)[1]


def test_background_stays_fixed_in_about_ninety_percent_of_views():
    n = 4000
    fixed = sum(view_params(seed, f"task-{seed % 37}", seed % 8, 3).color_map[0] == 0 for seed in range(n))
    # P(0 fixed) = 0.9 + 0.1 * 1/10 = 0.91; 5 standard deviations of a binomial(4000, 0.91) is +-0.023.
    assert abs(fixed / n - 0.91) < 0.023
    for seed in range(50):
        assert sorted(view_params(seed, "t", 0, 3).color_map) == list(range(10))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model_dir("tiny-random-qwen2"))


SMALL = parse_task({"task_id": "small", "train": [{"input": [[1, 0]], "output": [[0, 1]]},
                                                 {"input": [[2], [0]], "output": [[0], [2]]}],
                    "test": [{"input": [[3, 3, 0]], "output": [[0, 3, 3]]}]})

V1_TEXT = """<|im_start|>system
You are a helpful assistant.<|im_end|>
<|im_start|>user
Here is a puzzle from the Abstraction and Reasoning Corpus (ARC). The input and output grids below are examples of one transformation: work out the rule that turns every input into its output, then apply it to the test input. ARC rules build on four core priors: objectness, goal-directed behaviour, numbers & counting, and basic geometry & topology.

## Example 1

### Input

```grid shape: 1x2
1 10
```

### Output

```grid shape: 1x2
1 01
```

## Example 2

### Input

```grid shape: 2x1
1 2
2 0
```

### Output

```grid shape: 2x1
1 0
2 2
```

## Test case

### Input

```grid shape: 1x3
1 330
```
<|im_end|>
<|im_start|>assistant
### Output

```grid"""


def test_v1_prompt_is_pinned(tokenizer):
    encoder = parse_encoder(DEFAULT_ENCODER)
    [prompt] = build_prompts(SMALL, tokenizer, load_template("output-from-examples-v1"), encoder, 8192)
    assert prompt.text == V1_TEXT and prompt.train_dropped == 0
    assert list(prompt.token_ids) == tokenizer(V1_TEXT, add_special_tokens=False)["input_ids"]
    ids = list(prompt.token_ids)
    assert ids[0] == 151644 and ids.count(151644) == 3 and ids.count(151645) == 2  # no end of turn after the answer
    assert ids[-2:] == [73594, 4203] and tokenizer.decode(ids[-2:]) == "```grid"


def test_v0_prompt_is_pinned(tokenizer):
    encoder = parse_encoder("MinimalGridEncoder()")
    [prompt] = build_prompts(SMALL, tokenizer, load_template("output-from-examples-v0"), encoder, 8192,
                             include_answer=True)
    system, _, rest = prompt.text.partition("<|im_end|>\n<|im_start|>user\n")
    assert system.startswith("<|im_start|>system\nYou are a careful assistant that solves puzzles from the "
                             "Abstraction and Reasoning Corpus (ARC).\n")
    assert system.endswith("Every transformation follows from these priors.\n")
    assert rest == (
        "Try to solve this ARC puzzle. The input and output grids below are examples of the transformation.\n\n"
        "## Example 1\n\n### Input\n\n10\n\n### Output\n\n01\n\n"
        "## Example 2\n\n### Input\n\n2\n0\n\n### Output\n\n0\n2\n\n"
        "## Test case\n\n### Input\n\n330\n<|im_end|>\n<|im_start|>assistant\n### Output\n\n033")


def test_custom_template_renders_exactly_as_written(tmp_path, tokenizer):
    path = tmp_path / "mine.jinja"
    path.write_text("{% block system %}SYS{% endblock %}"
                    "{% block user %}{% for p in train_pairs %}[{{ p.input }}->{{ p.output }}]{% endfor %}"
                    "?{{ test_input }}{% endblock %}{% block assistant %}A:{{ answer }}{% endblock %}")
    [prompt] = build_prompts(SMALL, tokenizer, load_template(str(path)), parse_encoder("MinimalGridEncoder()"), 8192)
    assert prompt.text == ("<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\n[10->01][2\n0->0\n2]?330"
                           "<|im_end|>\n<|im_start|>assistant\nA:```grid")


def test_template_errors_are_clear(tmp_path):
    (tmp_path / "bad.jinja").write_text("{% block user %}x{% endblock %}")
    with pytest.raises(ValueError, match="lacks the block.*system"):
        load_template(str(tmp_path / "bad.jinja"))
    with pytest.raises(ValueError, match="neither built in nor a file|neither built in"):
        load_template("output-from-examples-v9")
    (tmp_path / "escape.jinja").write_text(
        "{% block system %}{{ ''.__class__.__mro__ }}{% endblock %}{% block user %}{% endblock %}"
        "{% block assistant %}{% endblock %}")
    with pytest.raises(Exception):  # the sandbox refuses attribute access to internals
        build_prompts(SMALL, None, load_template(str(tmp_path / "escape.jinja")), parse_encoder(DEFAULT_ENCODER), 10)


def test_overlong_task_drops_train_examples_from_the_end(tokenizer):
    task = make_task(n_train=6, size=12, task_id="big")
    template, encoder = load_template("output-from-examples-v1"), parse_encoder(DEFAULT_ENCODER)
    [full] = build_prompts(task, tokenizer, template, encoder, 100000)
    [one] = build_prompts(dataclass_replace(task, train=task.train[:1]), tokenizer, template, encoder, 100000)
    budget = (len(full.token_ids) + len(one.token_ids)) // 2
    [fitted] = build_prompts(task, tokenizer, template, encoder, budget)
    assert isinstance(fitted, Prompt) and 0 < fitted.train_dropped < 6 and len(fitted.token_ids) <= budget
    kept = 6 - fitted.train_dropped
    assert f"## Example {kept}\n" in fitted.text and f"## Example {kept + 1}\n" not in fitted.text
    assert encoder.encode(task.train[kept - 1][0]) in fitted.text  # kept the first examples, in order
    assert encoder.encode(task.test[0][0]) in fitted.text and fitted.text.endswith("### Output\n\n```grid")
    [too_long] = build_prompts(task, tokenizer, template, encoder, len(one.token_ids) - 1)
    assert isinstance(too_long, PromptTooLong) and too_long.tokens_with_one_example == len(one.token_ids)


def dataclass_replace(task, **changes):
    import dataclasses

    return dataclasses.replace(task, **changes)


@pytest.mark.parametrize("obj, reason", [
    ({"train": [], "test": [{"input": [[1]]}]}, "empty_train"),
    ({"train": [{"input": [[1]], "output": [[1]]}], "test": []}, "empty_test"),
    ({"train": [{"input": [[1]], "output": [[1, 2], [3]]}], "test": [{"input": [[1]]}]}, "ragged_grid"),
    ({"train": [{"input": [[12]], "output": [[1]]}], "test": [{"input": [[1]]}]}, "value_out_of_range"),
    ({"train": [{"input": [[1] * 40], "output": [[1]]}], "test": [{"input": [[1]]}]}, "grid_too_large"),
    ({"train": [{"input": "1", "output": [[1]]}], "test": [{"input": [[1]]}]}, "wrong_type"),
    ({"test": [{"input": [[1]]}]}, "missing_field"),
])
def test_bad_tasks_have_typed_reasons(obj, reason):
    with pytest.raises(InvalidRecord) as error:
        parse_task(obj)
    assert error.value.reason == reason


def test_fitting_a_long_task_renders_log2_of_its_train_examples_not_all_of_them():
    """200 train pairs of 10x10 grids into a budget that holds about half: a search, not a loop that
    drops one example per render (which made fitting quadratic in train pairs)."""
    from beam_extract.arc.encoders import DEFAULT_ENCODER, parse_encoder
    from beam_extract.arc.prompt import DEFAULT_TEMPLATE, PromptTemplate, build_prompts, load_template
    from beam_extract.model.weights import resolve_model_dir
    from beam_extract.records.arc import ArcTask
    from beam_extract.tokenize import load_tokenizer

    grid = tuple(tuple((r * c) % 10 for c in range(10)) for r in range(10))
    task = ArcTask("long", tuple((grid, grid) for _ in range(200)), ((grid, None),), "in.jsonl", 1)
    tokenizer = load_tokenizer(resolve_model_dir("tiny-random-qwen2", weights=False))
    renders = []

    class Counting(PromptTemplate):
        def render(self, *args):
            renders.append(len(args[0]))
            return super().render(*args)

    template = load_template(DEFAULT_TEMPLATE)
    counted = Counting(template.name, template.source)
    encoder = parse_encoder(DEFAULT_ENCODER)
    one_pair = build_prompts(ArcTask("one", task.train[:1], task.test, "in.jsonl", 1), tokenizer, template, encoder,
                             1 << 20)[0]
    budget = len(one_pair.token_ids) * 100  # about 100 of the 200 pairs fit
    [prompt] = build_prompts(task, tokenizer, counted, encoder, budget)
    assert 0 < prompt.train_dropped < 200 and len(prompt.token_ids) <= budget
    assert len(renders) <= 1 + 8  # all 200, then a bisection of 1..199
    longer = [p for p in build_prompts(ArcTask("x", task.train[: 200 - prompt.train_dropped + 1], task.test,
                                                "in.jsonl", 1), tokenizer, template, encoder, budget)]
    assert longer[0].train_dropped == 1  # one more example would not have fit: the most that fit were kept
