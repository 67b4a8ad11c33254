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
from transformers import PreTrainedTokenizerFast

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


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CORPUS = ["the cat sat on the mat 12345 678 9 x1y2 it's", "Next line\n\n  indented 2024: done.\n- item"] * 40


def trained(style: str) -> PreTrainedTokenizerFast:
    """A small tokenizer of each pre-tokenization style our families use, trained here (no hub)."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers

    if style == "llama3":  # byte-level BPE, digits in groups of up to 3 (GPT-2: any run)
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
                                                         pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                  use_regex=False)])
        backend.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:  # Mistral / Llama 2: a `▁` prepended to every text
        backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        alphabet = []
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, initial_alphabet=alphabet,
                                                            special_tokens=["<unk>", "<s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>")


@pytest.mark.parametrize("style, rule", [("qwen2", "cut_after_word"), ("llama3", "cut_at_line_start"),
                                         ("prepend", None)])
def test_a_long_document_gives_the_whole_texts_tokens_whatever_the_tokenizer(style, rule):
    """Long documents are tokenized in pieces (bounded memory) only where the tokenizer's pieces give
    the whole text's tokens: at Qwen2's word ends, at line starts for digit-grouping byte-level BPE,
    nowhere for a tokenizer that prepends to every text."""
    from beam_extract.tokenize import CHUNK_CHARS, safe_cut

    tokenizer = (load_tokenizer(resolve_model_dir("tiny-random-qwen2", weights=False)) if style == "qwen2"
                 else trained(style))
    assert getattr(safe_cut(tokenizer), "__name__", None) == rule
    rng = np.random.default_rng(0)
    words = ["cat", "12345", "x1y2", "it's", "\n", "\n\n", "  ", "2024:", "mat.\n", "Next", "- item", "678"]
    text = "".join(rng.choice(words) + rng.choice(["", " "]) for _ in range(3 * CHUNK_CHARS // 5))
    assert len(text) > 2 * CHUNK_CHARS
    whole = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
    assert text_token_ids(tokenizer, text).tolist() == whole


def test_a_base_model_without_a_chat_template_runs_text_and_dead_letters_arc(tmp_path):
    from apache_beam.options.pipeline_options import PipelineOptions

    from beam_extract.job import make_job
    from beam_extract.options import UsageError

    model = tmp_path / "model"
    shutil.copytree(resolve_model_dir("tiny-random-qwen2"), model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    make_job(PipelineOptions([f"--model={model}", f"--output={tmp_path}/out"]))  # auto: text runs
    with pytest.raises(UsageError, match="no_chat_template: the model's tokenizer has no chat template"):
        make_job(PipelineOptions([f"--model={model}", f"--output={tmp_path}/out", "--input_format=arc"]))


@pytest.mark.parametrize("style", ["qwen2", "llama3", "prepend"])
def test_markers_as_text_use_the_tokenizers_own_definition_without_its_added_tokens(style):
    """The tokenizer that reads markers as text shares the vocabulary model and is, step for step,
    the tokenizer's definition with no added tokens (and no truncation or padding)."""
    import json

    from beam_extract.tokenize import _plain_tokenizer

    tokenizer = (load_tokenizer(resolve_model_dir("tiny-random-qwen2", weights=False)) if style == "qwen2"
                 else trained(style))
    tokenizer.backend_tokenizer.enable_truncation(8)
    expected = json.loads(tokenizer.backend_tokenizer.to_str()) | {"added_tokens": [], "truncation": None}
    assert json.loads(_plain_tokenizer(tokenizer).to_str()) == expected
    assert len(_plain_tokenizer(tokenizer).encode("<|im_end|> " * 20, add_special_tokens=False).ids) > 8
