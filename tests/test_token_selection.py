"""Which tokens are stored: special-token exclusion, position slices, the ARC test part."""

import numpy as np
import pytest

from beam_extract.arc import DEFAULT_ENCODER, build_prompts, load_template, parse_encoder, parse_task
from beam_extract.model.weights import resolve_model_dir
from beam_extract.records.dead_letter import DeadLetter
from beam_extract.tokenize import (Sample, TokenSelection, load_tokenizer, parse_positions, select,
                                   special_token_ids)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model_dir("tiny-random-qwen2", weights=False))


def test_position_slices():
    ids = np.arange(10, 20)
    assert list(TokenSelection(positions=parse_positions("-3:")).indices(ids)) == [7, 8, 9]
    assert list(TokenSelection(positions=parse_positions("2:8:3")).indices(ids)) == [2, 5]
    assert TokenSelection(positions=parse_positions(":")).indices(ids) is None  # everything
    for bad in ("5", "a:b", "1:2:3:4"):
        with pytest.raises(ValueError, match="--positions"):
            parse_positions(bad)


def test_special_tokens_are_excluded(tokenizer):
    specials = special_token_ids(tokenizer)
    # Qwen2.5 marks its chat and end-of-text markers special, and its vision and object markers
    # (151646-151656); <tool_call> and the fill-in-the-middle markers are added tokens it does not
    # mark special: they are stored as text.
    assert specials == set(range(151643, 151657))
    assert not specials & {tokenizer.convert_tokens_to_ids(t) for t in ("<tool_call>", "<|fim_prefix|>")}
    ids = np.asarray(tokenizer("<|im_start|>user\nhi<|im_end|>\n<|endoftext|>", add_special_tokens=False)["input_ids"])
    kept = TokenSelection(specials, parse_positions("1:")).indices(ids)
    assert tokenizer.decode(ids[kept]) == "user\nhi\n"
    empty = select(Sample("s", np.array([151643], np.int32), "f", 3), TokenSelection(specials))
    assert isinstance(empty, DeadLetter) and empty.reason == "no_tokens_selected"


def test_arc_test_part_starts_at_the_test_input(tokenizer):
    grid = [[1, 2], [3, 4]]
    task = parse_task({"task_id": "t", "train": [{"input": grid, "output": grid}] * 2,
                       "test": [{"input": [[5, 5]], "output": [[6]]}]})
    encoder = parse_encoder(DEFAULT_ENCODER)
    [prompt] = build_prompts(task, tokenizer, load_template("output-from-examples-v1"), encoder, 8192,
                             include_answer=True)
    kept = TokenSelection(arc_test_only=True).indices(prompt.token_ids, prompt.test_start)
    text = tokenizer.decode(prompt.token_ids[kept])
    assert text.startswith(encoder.encode(((5, 5),))) and text.endswith(encoder.encode(((6,),)))
    assert "## Example" not in text
