"""Names of input files that do not depend on how --input was spelled.

A sample id is built from its document's file name relative to the *input root*: the directory part
of --input before its first wildcard (`data/*.jsonl` -> `data`, `gs://b/x/**/*.gz` -> `gs://b/x`,
`data/a.jsonl` -> `data`). So `data/*.jsonl`, `/home/me/data/*.jsonl`, `data/a.jsonl` and a copy at
`gs://bucket/data/*.jsonl` name the same file `a.jsonl`, and two files matched by one glob never
share a name.
"""

from __future__ import annotations

import re

_WILDCARD = re.compile(r"[*?\[]")


def input_root(pattern: str) -> str:
    match = _WILDCARD.search(pattern)
    head = pattern[: match.start()] if match else pattern
    return head.rpartition("/")[0]


def relative_name(path: str, root: str) -> str:
    """`path` below `root`; a path elsewhere (which a glob under root never yields) keeps its whole name."""
    prefix = f"{root}/" if root else ""
    return path[len(prefix):] if prefix and path.startswith(prefix) else path
