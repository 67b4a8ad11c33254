"""Which committed groups readers read and a resumed run keeps (`select_groups`): every committed
sample is read, each once, or the overlap is reported; a group is never hidden silently."""

import json
import warnings
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from beam_extract.format.commits import select_groups
from beam_extract.readers.reader import (IncompleteRunWarning, hook_files, read_activations, read_plan, token_batches,
                                        write_snapshot)

HOOK = "blocks.0.hook_resid_post"


def group(name: str, samples: list[str], written: str = "2026-12-06T10:00:00") -> dict:
    return {"group": name, "written": written, "samples": samples, "digests": ["0" * 16] * len(samples),
            "hooks": {HOOK: {"files": [f"resid_post/layer_00/part-{name}.tfrecord"]}}}


groups_of_samples = st.lists(
    st.tuples(st.lists(st.sampled_from([f"s{i}" for i in range(12)]), min_size=1, max_size=6),
              st.sampled_from(["10:00", "10:01", "10:02"])),
    max_size=8)


@settings(max_examples=300, deadline=None)
@given(groups_of_samples)
def test_every_committed_sample_is_read_exactly_once_or_the_overlap_is_reported(drawn):
    groups = [group(f"{i:012x}-{i:012x}", samples, f"2026-12-06T{at}:00") for i, (samples, at) in enumerate(drawn)]
    selection = select_groups(groups)
    committed = {s for g in groups for s in g["samples"]}
    read = Counter(s for g in selection.readable for s in g["samples"])
    assert set(read) == committed  # no sample of a committed group is lost to a reader
    kept = Counter(s for g in selection.kept for s in g["samples"])
    assert set(kept.values()) <= {1}  # what a resumed run keeps holds each sample once
    names = lambda gs: sorted(g["group"] for g in gs)  # noqa: E731
    assert names(selection.kept + selection.dropped) == names(groups)  # every group is kept or dropped
    left_out = [g for g in selection.dropped if g not in selection.overlapping]
    assert all(set(g["samples"]) <= set(kept) for g in left_out)  # left out only if nothing is lost
    if any(n > 1 for n in read.values()):
        repeated_in = {g["group"] for g in selection.readable if any(read[s] > 1 for s in g["samples"])}
        assert selection.problems and all(any(name in p for p in selection.problems)
                                          for name in repeated_in - set(names(selection.kept)))
    # No group is hidden silently: any overlap at all is reported.
    overlap = sum(len(g["samples"]) for g in groups) != len(committed)
    assert bool(selection.problems) == overlap
    assert (f"{len(left_out)} commit groups are left out" in " ".join(selection.problems)) == bool(left_out)


@pytest.mark.parametrize("where", ["local", "gs"])
def test_the_issue_26_groups_read_uniq2_and_say_dup1_is_read_twice(tmp_path, where, request):
    """A streaming job of 1721706 committed [dup1] and, a window later, [dup1, uniq2]: the reader
    read only the first, silently. Now it reads both and warns; a snapshot carries the warning."""
    (tmp_path / "_committed").mkdir()
    for g in (group("000000000001-000000000001", ["a.jsonl:1#w0/dup1"], "2026-12-06T10:00:00"),
              group("000000000002-000000000002", ["a.jsonl:1#w0/dup1", "b.jsonl:2#w0/uniq2"], "2026-12-06T10:01:00")):
        (tmp_path / f"_committed/{g['group']}.json").write_text(json.dumps(g))
    with pytest.warns(IncompleteRunWarning, match="000000000002-000000000002 holds 2 samples, 1 of them also"):
        files = hook_files(str(tmp_path), HOOK)
    assert [f.rpartition("part-")[2] for f in files] == ["000000000001-000000000001.tfrecord",
                                                          "000000000002-000000000002.tfrecord"]
    snapshot = f"{tmp_path}-plan.json" if where == "local" else f"{request.getfixturevalue('gcs_bucket')}/plan.json"
    write_snapshot(str(tmp_path), snapshot)
    plan = read_plan(snapshot)
    assert plan.source == "snapshot" and plan.fixed and plan.files(HOOK) == files
    assert any("000000000002-000000000002" in p for p in plan.problems)


def test_a_snapshot_is_never_written_into_the_output_and_spellings_of_a_path_plan_alike(tmp_path):
    manifest = {"ok": True, "problems": [], "hooks": {HOOK: {"files": ["resid_post/layer_00/part-x.tfrecord"]}}}
    (tmp_path / "out").mkdir()
    (tmp_path / "out/manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="inside the output"):  # a later --resume would refuse the output
        write_snapshot(str(tmp_path / "out"), str(tmp_path / "out/plan.json"))
    assert not (tmp_path / "out/plan.json").exists()
    digests = {read_plan(spelling).digest([HOOK]) for spelling in (f"{tmp_path}/out", f"{tmp_path}//out/",
                                                                    f"{tmp_path}/./out")}
    assert len(digests) == 1  # ranks given the same output in other spellings agree
    with pytest.raises(ValueError, match="distinct hooks"):
        token_batches(str(tmp_path / "out"), hooks=HOOK)  # a string, not a list of hooks


def test_a_finished_ok_run_reads_without_a_warning_and_one_not_ok_warns(tmp_path):
    manifest = {"ok": True, "problems": [], "hooks": {HOOK: {"files": ["resid_post/layer_00/part-x.tfrecord"]}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hook_files(str(tmp_path), HOOK) == [f"{tmp_path}/resid_post/layer_00/part-x.tfrecord"]
    with pytest.raises(KeyError, match="has no hook"):
        hook_files(str(tmp_path), "blocks.9.hook_resid_post")
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "ok": False, "problems": ["3 lines lost"]}))
    with pytest.warns(IncompleteRunWarning, match=r"ok: false \(3 lines lost\)"):
        hook_files(str(tmp_path), HOOK)
    for reader in (read_activations, lambda path, hook: token_batches(path, hook, 64)):
        with pytest.warns(IncompleteRunWarning, match="ok: false") as warned:
            reader(str(tmp_path), HOOK)
        assert warned[0].filename == __file__  # the warning points at the reader's caller
    with warnings.catch_warnings():
        warnings.simplefilter("error", IncompleteRunWarning)  # how a user refuses such a run
        with pytest.raises(IncompleteRunWarning):
            hook_files(str(tmp_path), HOOK)
