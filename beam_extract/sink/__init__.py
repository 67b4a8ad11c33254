"""Writing the output from the pipeline (Beam): the records of each forward batch (`extracted`),
rolling shards committed per group (`writer`, `commits`), streaming windows' indexes (`windows`),
the manifest (`manifest`) and the lock that makes a run the output's one writer (`ownership`).
What it writes is read back through `beam_extract.format`, which imports nothing from here."""
