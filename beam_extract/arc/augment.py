"""Deterministic ARC augmentation: dihedral transform x colour permutation x train order.

Every random choice comes from a generator seeded by (seed, task_id, view), never from global
state, so a re-run or a resumed run rebuilds byte-identical views on any machine.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from beam_extract.records.arc import ArcTask, Grid

# The 8 elements of the dihedral group, in the order views cycle through them.
GEOMETRIC = tuple((hflip, k) for hflip in (False, True) for k in range(4))
PERMUTE_BACKGROUND_PROBABILITY = 0.1


@dataclasses.dataclass(frozen=True)
class ViewParams:
    view: int
    hflip: bool
    k: int  # counter-clockwise quarter turns (numpy's rot90), applied after the flip
    color_map: tuple[int, ...]  # color_map[old colour] = new colour
    train_order: tuple[int, ...]  # view's train example i is the task's train[train_order[i]]

    def as_dict(self) -> dict:
        return dataclasses.asdict(self) | {"color_map": list(self.color_map), "train_order": list(self.train_order)}


def view_rng(seed: int, task_id: str, view: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}\x00{task_id}\x00{view}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def view_params(seed: int, task_id: str, view: int, n_train: int) -> ViewParams:
    rng = view_rng(seed, task_id, view)
    hflip, k = GEOMETRIC[view % len(GEOMETRIC)]
    if rng.random() < PERMUTE_BACKGROUND_PROBABILITY:
        color_map = rng.permutation(10)
    else:  # background 0 stays 0
        color_map = np.concatenate([[0], 1 + rng.permutation(9)])
    return ViewParams(view, hflip, k, tuple(int(c) for c in color_map),
                      tuple(int(i) for i in rng.permutation(n_train)))


def transform_grid(grid: Grid, params: ViewParams) -> Grid:
    array = np.asarray(grid)
    array = np.rot90(np.fliplr(array) if params.hflip else array, params.k)
    return tuple(tuple(int(c) for c in row) for row in np.asarray(params.color_map)[array])


def undo_grid(grid: Grid, params: ViewParams) -> Grid:
    """The inverse of transform_grid: maps a grid of the view back to the original task's frame."""
    inverse_colors = np.argsort(params.color_map)
    array = np.rot90(inverse_colors[np.asarray(grid)], -params.k)
    array = np.fliplr(array) if params.hflip else array
    return tuple(tuple(int(c) for c in row) for row in array)


@dataclasses.dataclass(frozen=True)
class ArcView:
    """One augmented view of a task: its grids already transformed, its train examples reordered."""

    task: ArcTask
    params: ViewParams

    @property
    def source(self) -> str:
        return self.task.source

    @property
    def line_number(self) -> int:
        return self.task.line_number


def augment(task: ArcTask, seed: int, view: int) -> tuple[ArcTask, ViewParams]:
    """View `view` of `task`: the same transform on every grid, train examples reordered, test
    order kept."""
    params = view_params(seed, task.task_id, view, len(task.train))

    def grid(g):
        return None if g is None else transform_grid(g, params)

    train = tuple((grid(task.train[i][0]), grid(task.train[i][1])) for i in params.train_order)
    test = tuple((grid(inp), grid(out)) for inp, out in task.test)
    return dataclasses.replace(task, train=train, test=test), params


def views(task: ArcTask, seed: int, views_per_task: int) -> list[ArcView]:
    """Views 0..N-1, cycling through the 8 geometric transforms, each with its own colours and order."""
    return [ArcView(*augment(task, seed, view)) for view in range(views_per_task)]
