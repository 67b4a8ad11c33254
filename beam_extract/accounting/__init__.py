"""Run accounting, in one place: every input line and every sample accounted for.

- `lines`: each line of each input file marked as having produced samples or a dead letter (Beam).
- `totals`: the run's (or a streaming window's) combined results, as one typed `RunTotals` (Beam).
- `invariants`: the counts the manifest reports and the invariants `ok` stands for (pure, no Beam).
"""
