"""The tokenizer and chat template come from the model directory, whatever the family: a BOS where
the tokenizer adds one, the template's own markers, a template that refuses a system turn, the
tokenizer's own special tokens, and a clear error when the files are missing. A Gemma-like
tokenizer is made from the tiny Qwen2 one (no hub): a BOS-adding post-processor and Gemma 2's
chat template structure."""

import json
import shutil

import numpy as np
import pytest
from tokenizers import Tokenizer, processors

from beam_extract.arc.augment import ArcView, augment
from beam_extract.arc.encoders import DEFAULT_ENCODER, parse_encoder
from beam_extract.arc.prompt import DEFAULT_TEMPLATE, build_prompts, load_template
from beam_extract.model.weights import CheckpointError, resolve_model_dir
from beam_extract.records.parse import parse_line
from beam_extract.records.source_line import SourceLine
from beam_extract.tokenize import (PromptSettings, TokenSelection, load_tokenizer, special_token_ids, text_token_ids,
                                   to_samples)

BOS = 151643  # <|endoftext|> stands in for a BOS
GEMMA_LIKE_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' "
    "else message['role']) + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}")


@pytest.fixture(scope="module")
def gemma_like(tmp_path_factory):
    source, directory = resolve_model_dir("tiny-random-qwen2", weights=False), tmp_path_factory.mktemp("gemma_like")
    backend = Tokenizer.from_file(str(source / "tokenizer.json"))
    backend.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", pair="<|endoftext|> $A $B",
                                                           special_tokens=[("<|endoftext|>", BOS)])
    backend.save(str(directory / "tokenizer.json"))
    config = json.loads((source / "tokenizer_config.json").read_text())
    config.update(bos_token="<|endoftext|>", chat_template=GEMMA_LIKE_TEMPLATE)
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return load_tokenizer(directory)


def line(obj: dict) -> SourceLine:
    return SourceLine("in.jsonl", 1, json.dumps(obj).encode())


def test_every_text_window_starts_with_the_tokenizers_bos(gemma_like):
    text = " ".join(f"word{i}" for i in range(40))
    content = text_token_ids(gemma_like, text)
    samples = to_samples(parse_line(line({"text": text}), "text", root="."), gemma_like, None, 16,
                         TokenSelection(special_token_ids(gemma_like)))
    assert len(samples) == -(-len(content) // 15) > 2
    assert all(s.token_ids[0] == BOS and len(s.token_ids) <= 16 for s in samples)
    assert np.concatenate([s.token_ids[1:] for s in samples]).tolist() == content.tolist()
    assert all(s.stored.tolist() == list(range(1, len(s.token_ids))) for s in samples)  # the BOS runs, unstored


def test_a_chat_template_without_a_system_turn_gets_it_in_the_users(gemma_like):
    task = {"task_id": "t", "train": [{"input": [[1, 2]], "output": [[2, 1]]}], "test": [{"input": [[3, 4]]}]}
    record = parse_line(line(task), "arc", root=".")
    template = load_template(DEFAULT_TEMPLATE)
    [prompt] = build_prompts(record, gemma_like, template, parse_encoder(DEFAULT_ENCODER), 8192)
    system = template.render([{"input": "x", "output": "y"}], "z", "```grid")[0]["content"]
    assert prompt.text.startswith(f"<|endoftext|><start_of_turn>user\n{system.strip()}")
    assert "<start_of_turn>model\n" in prompt.text and prompt.text.endswith("```grid")  # at the answer, no end of turn
    assert prompt.token_ids[0] == BOS and (prompt.token_ids == BOS).sum() == 1  # the template's BOS, no second
    settings = PromptSettings(template, DEFAULT_ENCODER, parse_encoder(DEFAULT_ENCODER), False)
    [sample] = to_samples(ArcView(*augment(record, 0, 0)), gemma_like, settings, 8192,
                          TokenSelection(special_token_ids(gemma_like)))
    assert BOS not in sample.token_ids[sample.stored]


def test_a_model_directory_without_a_tokenizer_is_refused_by_name(tmp_path):
    source = resolve_model_dir("tiny-random-qwen2", weights=False)
    shutil.copy(source / "config.json", tmp_path / "config.json")
    shutil.copy(source / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    with pytest.raises(CheckpointError, match="no tokenizer: a --model directory needs tokenizer.json"):
        load_tokenizer(tmp_path)
