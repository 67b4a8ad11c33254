"""Parsing and validation of input lines into documents or ARC tasks; failures become dead letters."""

from beam_extract.records.dead_letter import DeadLetter
from beam_extract.records.parse import parse_line

__all__ = ["DeadLetter", "parse_line"]
