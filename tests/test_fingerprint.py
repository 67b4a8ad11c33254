"""Which options a run's fingerprint holds, and that a --resume changing one is refused: checked on
the fingerprint and its comparison directly (resume.fingerprint, resume.refuse_changes), in process."""

import pytest

from beam_extract.options import OPTIONS, JobOptions, Option, flag
from beam_extract.resume import FINGERPRINTED, fingerprint, refuse_changes
from beam_extract.sink.ownership import OutputRefused

DEFAULTS = {option.name: option.default for option in OPTIONS}
# Everything outside the options: the same for both runs unless a test says otherwise.
IDENTITY = dict(weights_sha256="w" * 64, config={"hidden_size": 64, "num_layers": 4}, tokenizer_sha256="t" * 64,
                hooks=["blocks.0.hook_resid_post"], template_sha256="p" * 64, software={"jax": "0.7.0"},
                device={"platform": "cpu"}, created="2026-01-01T00:00:00+00:00")


def other_value(option: Option):
    """A valid value of `option` other than its default."""
    if option.choices:
        return next(choice for choice in option.choices if choice != option.default)
    if option.kind is flag:
        return not option.default
    if option.kind is int:
        return option.default + 1 if option.maximum is None or option.default < option.maximum else option.default - 1
    return f"{option.default or ''}-other"


def refusal(before_options: dict, now_options: dict, accept_software_change: bool = False, **now) -> str | None:
    """The refusal of a --resume with `now_options` of a run made with `before_options` (None: none)."""
    before = fingerprint(JobOptions(**before_options), **IDENTITY)
    try:
        refuse_changes("out", before, fingerprint(JobOptions(**now_options), **{**IDENTITY, **now}), accept_software_change)
    except OutputRefused as refused:
        return str(refused)
    return None


def test_every_option_declares_whether_it_is_in_the_fingerprint():
    assert all(isinstance(option.fingerprinted, bool) for option in OPTIONS)
    with pytest.raises(TypeError, match="fingerprinted"):  # a new option cannot leave it out
        Option("new", 0, "A new option", "input", int)


def test_the_fingerprinted_options_are_the_reviewed_ones():
    """Changing this list changes which resumptions are refused: a value that decides which samples
    exist or what their activations are must be in it (the model, hooks, prompt template and input
    files are identified apart)."""
    assert FINGERPRINTED == (
        "input_format", "text_field", "id_field", "tokens_field", "prepend_bos", "max_line_bytes", "max_expansion",
        "special_tokens_in_text", "max_seq_len", "views_per_task", "seed", "grid_encoder", "include_answer", "dtype",
        "output_dtype", "exclude_special_tokens", "positions", "arc_tokens", "norm_exclude_first")


@pytest.mark.parametrize("option", [o for o in OPTIONS if o.fingerprinted], ids=lambda o: o.name)
def test_a_resumption_that_changes_a_fingerprinted_option_is_refused(option):
    changed = {**DEFAULTS, option.name: other_value(option)}
    assert refusal(DEFAULTS, DEFAULTS) is None
    refused = refusal(DEFAULTS, changed)
    assert refused and f"holds a run with other settings: {option.name}: " in refused, refused


@pytest.mark.parametrize("option", [o for o in OPTIONS if not o.fingerprinted], ids=lambda o: o.name)
def test_a_resumption_may_change_any_other_option(option):
    assert refusal(DEFAULTS, {**DEFAULTS, option.name: other_value(option)}) is None


def test_software_differences_need_accepting_and_the_creation_date_is_never_compared():
    newer = dict(software={"jax": "0.8.0"})
    refused = refusal(DEFAULTS, DEFAULTS, **newer)
    assert "software.jax: " in refused and "--accept_software_change" in refused, refused
    assert refusal(DEFAULTS, DEFAULTS, accept_software_change=True, **newer) is None
    assert refusal(DEFAULTS, DEFAULTS, created="2027-01-01T00:00:00+00:00") is None
    assert "hooks" in refusal(DEFAULTS, DEFAULTS, hooks=["blocks.1.hook_resid_post"])

