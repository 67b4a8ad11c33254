"""Grid <-> text encoders of the arc24 fine-tuned models, composable and chosen by name.

`parse_encoder("GridShapeEncoder(RowNumberEncoder(MinimalGridEncoder()))")` builds an encoder from
its name with a small parser (never `eval`). Every encoder decodes its own text back to the grid.
"""

from __future__ import annotations

import dataclasses
import re

from beam_extract.records.arc import Grid

DEFAULT_ENCODER = "GridShapeEncoder(RowNumberEncoder(MinimalGridEncoder()))"
REPLACEMENT_SYMBOLS = "ñò÷ûąćďęĚĞ"  # stand-ins for the digits 0..9


class Encoder:
    def encode(self, grid: Grid) -> str:
        raise NotImplementedError

    def decode(self, text: str) -> Grid:
        raise NotImplementedError


def _rows(text: str) -> list[str]:
    return text.split("\n")


@dataclasses.dataclass(frozen=True)
class MinimalGridEncoder(Encoder):
    """`100\\n010`"""

    def encode(self, grid: Grid) -> str:
        return "\n".join("".join(str(cell) for cell in row) for row in grid)

    def decode(self, text: str) -> Grid:
        return tuple(tuple(int(ch) for ch in line) for line in _rows(text))


@dataclasses.dataclass(frozen=True)
class GridWithSeparationEncoder(Encoder):
    """`1|0|0\\n0|1|0`"""

    separator: str

    def encode(self, grid: Grid) -> str:
        return "\n".join(self.separator.join(str(cell) for cell in row) for row in grid)

    def decode(self, text: str) -> Grid:
        return tuple(tuple(int(cell) for cell in line.split(self.separator)) for line in _rows(text))


@dataclasses.dataclass(frozen=True)
class RepeatNumberEncoder(Encoder):
    """Each digit written `n` times: n=2 gives `1100\\n0011` for [[1,0],[0,1]]."""

    n: int = 3

    def encode(self, grid: Grid) -> str:
        return "\n".join("".join(str(cell) * self.n for cell in row) for row in grid)

    def decode(self, text: str) -> Grid:
        return tuple(tuple(int(line[i]) for i in range(0, len(line), self.n)) for line in _rows(text))


@dataclasses.dataclass(frozen=True)
class GridCodeBlockEncoder(Encoder):
    """The base text in a ```grid code block."""

    base: Encoder

    def encode(self, grid: Grid) -> str:
        return f"```grid\n{self.base.encode(grid)}\n```"

    def decode(self, text: str) -> Grid:
        if not (text.startswith("```grid\n") and text.endswith("\n```")):
            raise ValueError("not a ```grid code block")
        return self.base.decode(text[len("```grid\n") : -len("\n```")])


@dataclasses.dataclass(frozen=True)
class GridShapeEncoder(Encoder):
    """A code block whose header states the shape: ```grid shape: ROWSxCOLS."""

    base: Encoder

    def encode(self, grid: Grid) -> str:
        return f"```grid shape: {len(grid)}x{len(grid[0])}\n{self.base.encode(grid)}\n```"

    def decode(self, text: str) -> Grid:
        header, _, rest = text.partition("\n")
        match = re.fullmatch(r"```grid shape: (\d+)x(\d+)", header)
        if not match or not rest.endswith("\n```"):
            raise ValueError("not a ```grid shape: RxC code block")
        grid = self.base.decode(rest[: -len("\n```")])
        if (len(grid), len(grid[0])) != (int(match.group(1)), int(match.group(2))):
            raise ValueError(f"grid is {len(grid)}x{len(grid[0])}, header says {match.group(1)}x{match.group(2)}")
        return grid


@dataclasses.dataclass(frozen=True)
class RowNumberEncoder(Encoder):
    """Each line prefixed by its 1-based row number and a space: `1 100\\n2 010`."""

    base: Encoder

    def encode(self, grid: Grid) -> str:
        return "\n".join(f"{i} {line}" for i, line in enumerate(_rows(self.base.encode(grid)), start=1))

    def decode(self, text: str) -> Grid:
        lines = []
        for i, line in enumerate(_rows(text), start=1):
            prefix = f"{i} "
            if not line.startswith(prefix):
                raise ValueError(f"line {i} does not start with its row number")
            lines.append(line[len(prefix) :])
        return self.base.decode("\n".join(lines))


@dataclasses.dataclass(frozen=True)
class ReplaceNumberEncoder(Encoder):
    """The base text with the digits 0..9 replaced by `ñ ò ÷ û ą ć ď ę Ě Ğ`."""

    base: Encoder

    def encode(self, grid: Grid) -> str:
        return self.base.encode(grid).translate(str.maketrans("0123456789", REPLACEMENT_SYMBOLS))

    def decode(self, text: str) -> Grid:
        return self.base.decode(text.translate(str.maketrans(REPLACEMENT_SYMBOLS, "0123456789")))


ENCODERS: dict[str, type[Encoder]] = {cls.__name__: cls for cls in (
    MinimalGridEncoder, GridWithSeparationEncoder, RepeatNumberEncoder, GridCodeBlockEncoder,
    GridShapeEncoder, RowNumberEncoder, ReplaceNumberEncoder)}

_TOKEN = re.compile(r"\s*(?:(?P<name>[A-Za-z]+)|(?P<int>\d+)|(?P<str>'[^']*'|\"[^\"]*\")|(?P<punct>[(),]))")


# Bounds on what a name can ask for: a grid's text grows with a repeat count, and the parser recurses.
MAX_REPEAT = 16
MAX_ENCODER_DEPTH = 16
MAX_SEPARATOR = 16


def parse_encoder(spec: str) -> Encoder:
    """Builds an encoder from a name like `RowNumberEncoder(GridWithSeparationEncoder('|'))`."""
    tokens = []
    position = 0
    spec = spec.strip()
    while position < len(spec):
        match = _TOKEN.match(spec, position)
        if not match:
            raise ValueError(f"encoder {spec!r}: cannot read {spec[position:]!r}")
        kind = match.lastgroup
        tokens.append((kind, match.group(kind)))
        position = match.end()
    tokens.append(("end", ""))
    index = 0

    def take(kind: str, text: str | None = None) -> str:
        nonlocal index
        got_kind, got_text = tokens[index]
        if got_kind != kind or (text is not None and got_text != text):
            raise ValueError(f"encoder {spec!r}: expected {text or kind}, found {got_text or 'the end'}")
        index += 1
        return got_text

    def expression(depth: int = 0):
        if depth > MAX_ENCODER_DEPTH:
            raise ValueError(f"encoder {spec[:80]!r}...: nested deeper than {MAX_ENCODER_DEPTH} encoders")
        kind, text = tokens[index]
        if kind == "int":
            return int(take("int"))
        if kind == "str":
            return take("str")[1:-1]
        name = take("name")
        if name not in ENCODERS:
            raise ValueError(f"encoder {spec!r}: unknown encoder {name!r}; known: {', '.join(ENCODERS)}")
        take("punct", "(")
        args = []
        while tokens[index] != ("punct", ")"):
            args.append(expression(depth + 1))
            if tokens[index] == ("punct", ","):
                take("punct", ",")
        take("punct", ")")
        try:
            encoder = ENCODERS[name](*args)
        except TypeError as error:
            raise ValueError(f"encoder {spec!r}: {name} {error}") from None
        for field, arg in zip(dataclasses.fields(encoder), args):
            given = "Encoder" if isinstance(arg, Encoder) else type(arg).__name__
            if given != field.type:  # annotations are strings here (postponed evaluation)
                raise ValueError(f"encoder {spec!r}: {name}'s {field.name} must be a {field.type}, not a {given}")
            if given == "int" and not 1 <= arg <= MAX_REPEAT:
                raise ValueError(f"encoder {spec!r}: {name}'s {field.name} must be 1 to {MAX_REPEAT}, not {arg}")
            if given == "str" and len(arg) > MAX_SEPARATOR:
                raise ValueError(f"encoder {spec[:80]!r}: {name}'s {field.name} is over {MAX_SEPARATOR} characters")
        return encoder

    encoder = expression()
    take("end")
    if not isinstance(encoder, Encoder):
        raise ValueError(f"encoder {spec!r} is not an encoder")
    return encoder


def encode_grid(grid: Grid, encoder: Encoder | str) -> str:
    return (parse_encoder(encoder) if isinstance(encoder, str) else encoder).encode(grid)


def decode_grid(text: str, encoder: Encoder | str) -> Grid:
    return (parse_encoder(encoder) if isinstance(encoder, str) else encoder).decode(text)
