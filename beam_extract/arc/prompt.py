"""ARC task -> chat messages whose assistant turn ends at the answer prefix (one per test input)."""

from __future__ import annotations

from beam_extract.records.arc import ArcTask, Grid

SYSTEM_PROMPT = "You are a helpful assistant."
INTRO = (
    "Let's see if you can solve this simple Abstraction and Reasoning Challenge (ARC) task. "
    "Below there are some input-output grid examples that define the task. Your job is to "
    "understand the transformation between the input and the output and apply it to the last "
    "input grid given to you. The transformation is based on four priors: objectness, "
    "goal-directed, numbers & counting, and basic geometry & topology."
)
ANSWER_OPENING = "```grid"


def encode_grid(grid: Grid) -> str:
    """The minimal encoding: one line per row, one digit per cell."""
    return "\n".join("".join(str(cell) for cell in row) for row in grid)


def prompt_messages(task: ArcTask, test_index: int) -> list[dict[str, str]]:
    examples = "".join(
        f"## Example {i}\n\n### Input\n\n{encode_grid(inp)}\n\n### Output\n\n{encode_grid(out)}\n"
        for i, (inp, out) in enumerate(task.train, start=1)
    )
    test_input, test_output = task.test[test_index]
    user = f"{INTRO}\n\n{examples}\n## Test case\n\n### Input\n\n{encode_grid(test_input)}\n"
    answer = encode_grid(test_output) if test_output is not None else ANSWER_OPENING
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": user},
        {"role": "assistant", "content": f"### Output\n\n{answer}"},
    ]
