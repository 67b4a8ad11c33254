"""ARC-AGI: validation, augmentation, grid encoders and prompts (pure functions, no Beam)."""

from beam_extract.arc.augment import ViewParams, augment, transform_grid, undo_grid
from beam_extract.arc.encoders import DEFAULT_ENCODER, decode_grid, encode_grid, parse_encoder
from beam_extract.arc.prompt import DEFAULT_TEMPLATE, Prompt, PromptTooLong, build_prompts, load_template
from beam_extract.records.arc import ArcTask, validate_task


def parse_task(obj: dict, source: str = "<memory>", line_number: int = 0) -> ArcTask:
    """A validated task; raises InvalidRecord (with a `reason` code) for a bad one."""
    return validate_task(obj, source, line_number)


__all__ = [
    "DEFAULT_ENCODER", "DEFAULT_TEMPLATE", "ArcTask", "Prompt", "PromptTooLong", "ViewParams", "augment",
    "build_prompts", "decode_grid", "encode_grid", "load_template", "parse_encoder", "parse_task",
    "transform_grid", "undo_grid",
]
