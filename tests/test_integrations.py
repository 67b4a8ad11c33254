"""Consumers of an output (beam_extract.integrations) on a real pipeline output: the PyTorch dataset
always; SAELens's provider and converter (marked `saelens`) where sae_lens is installed; and the
README's "Train an SAE from the output" snippets as written, against the output on gs://."""

import copy
import importlib.util
import itertools
import re
import shutil
from collections import Counter
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from beam_extract.integrations.pytorch import ActivationDataset, check_same_plan
from beam_extract.integrations.shards import batches_in_order, shard_plan
from beam_extract.readers.mixing import mixed_batches
from beam_extract.readers.reader import hook_files, read_activations
from conftest import free_port

HOOK = "blocks.1.hook_resid_post"
README = Path(__file__).parent.parent / "README.md"
README_PATH = "gs://my-bucket/acts/fineweb-q05b"
needs_saelens = pytest.mark.skipif(importlib.util.find_spec("sae_lens") is None,
                                   reason="sae_lens is not installed: pip install -e '.[saelens]' (.ci/run does)")


@pytest.fixture(scope="module")
def output(tmp_path_factory) -> str:
    """The default job's packaged samples at layer 1 through the tiny model, in files of at most 1 MB
    (4 for the hook). Run in a subprocess: this process stays without JAX and Beam, as a consumer's
    does, and forks its DataLoader workers safely."""
    out = tmp_path_factory.mktemp("integrations") / "acts"
    result = subprocess.run([sys.executable, "-m", "beam_extract", "--runner=DirectRunner", "--layers=1",
                             "--shard_size_mb=1", f"--output={out}"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-5000:]
    assert len(hook_files(str(out), HOOK)) >= 3
    return str(out)


@pytest.fixture(scope="module")
def tokens(output) -> np.ndarray:
    """Every stored token of the hook, in file and record order."""
    return np.concatenate([record["activations"] for record in read_activations(output, HOOK)])


def as_set(rows: np.ndarray) -> np.ndarray:
    """The rows sorted, to compare multisets of token activations exactly."""
    return rows[np.lexsort(rows.T[::-1])]


def drawn(dataset, **loader) -> list[torch.Tensor]:
    return list(DataLoader(dataset, batch_size=None, **loader))


@pytest.mark.slow
def test_importing_the_consumers_loads_no_framework(output):
    code = f"""
import sys
import beam_extract.integrations, beam_extract.integrations.shards
assert "torch" not in sys.modules
from beam_extract.integrations.pytorch import ActivationDataset, check_same_plan
import beam_extract.integrations.saelens
next(iter(ActivationDataset({output!r}, {HOOK!r}, 64)))
print(sorted(m for m in ("jax", "apache_beam", "transformers", "tensorflow", "sae_lens") if m in sys.modules))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("n_files", range(7))
def test_shards_read_every_record_once(n_files):
    records = [5 + 3 * f for f in range(n_files)]  # files of different lengths
    for n_shards in range(1, 9):
        read = []
        for shard in range(n_shards):
            plan = shard_plan(n_files, shard, n_shards)
            assert plan or n_files == 0, (n_files, shard, n_shards)  # no shard idles while there are files
            read += [(f, r) for f, first, stride in plan for r in range(records[f]) if r % stride == first]
        assert sorted(read) == [(f, r) for f in range(n_files) for r in range(records[f])], (n_files, n_shards)


def test_the_mixing_buffer_yields_every_row_once_in_a_seeded_order():
    rows = np.arange(1000, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    chunks = np.split(rows, [7, 100, 101, 450, 800])

    def ids(seed, drop_last=False):
        batches = list(mixed_batches(iter(chunks), 32, 200, np.random.default_rng(seed), drop_last))
        assert all(len(b) == 32 for b in batches[:-1]) and all(b.dtype == np.float32 for b in batches)
        return np.concatenate(batches)[:, 0].astype(int)

    first = ids(0)
    assert sorted(first) == list(range(1000))
    assert first.tolist() == ids(0).tolist() and first.tolist() != ids(1).tolist()
    assert np.abs(np.diff(first)).mean() > 50  # mixed, not read in order
    assert len(ids(0, drop_last=True)) == 992
    in_order = list(batches_in_order(iter(chunks), 32))
    assert np.concatenate(in_order)[:, 0].astype(int).tolist() == list(range(1000)) and len(in_order[-1]) == 8


@pytest.mark.slow
def test_two_workers_yield_each_token_once(output, tokens):
    dataset = ActivationDataset(output, HOOK, batch_tokens=512, seed=0)
    batches = drawn(dataset, num_workers=2)
    assert all(b.dtype == torch.float32 and b.shape[1] == dataset.d_model == tokens.shape[1] for b in batches)
    assert sum(len(b) == 512 for b in batches) >= len(batches) - 2  # a short batch at most per worker
    assert np.array_equal(as_set(torch.cat(batches).numpy()), as_set(tokens))


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_ddp_ranks_and_their_workers_share_out_the_tokens(output, tokens, world_size):
    """2 ranks x 2 workers: a file each; 3 x 2: more shards than files, records strided."""
    per_rank = [torch.cat(drawn(ActivationDataset(output, HOOK, 256, seed=3, rank=rank, world_size=world_size),
                                num_workers=2)).numpy() for rank in range(world_size)]
    assert all(len(rows) for rows in per_rank)
    assert np.array_equal(as_set(np.concatenate(per_rank)), as_set(tokens))


@pytest.mark.slow
def test_the_order_follows_the_seed_and_the_epoch(output, tokens):
    def order(seed, epoch=0):
        dataset = ActivationDataset(output, HOOK, 512, seed=seed, shuffle_buffer=4096)
        dataset.set_epoch(epoch)
        return torch.cat(drawn(dataset, num_workers=2)).numpy()

    first = order(0)
    assert np.array_equal(first, order(0))
    for other in (order(1), order(0, epoch=1)):
        assert not np.array_equal(first, other) and np.array_equal(as_set(other), as_set(first))
    assert not np.array_equal(first, tokens)


@pytest.mark.slow
def test_unshuffled_it_reads_the_tokens_in_order(output, tokens):
    batches = drawn(ActivationDataset(output, HOOK, 1000, shuffle=False))
    assert [len(b) for b in batches] == [1000] * (len(tokens) // 1000) + [len(tokens) % 1000]
    assert np.array_equal(torch.cat(batches).numpy(), tokens)
    assert len(drawn(ActivationDataset(output, HOOK, 1000, shuffle=False, drop_last=True))) == len(tokens) // 1000


@pytest.mark.slow
def test_bad_arguments_are_refused(output):
    with pytest.raises(ValueError, match="rank 2"):
        ActivationDataset(output, HOOK, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_tokens"):
        ActivationDataset(output, HOOK, 0)
    with pytest.raises(KeyError, match="blocks.0.hook_resid_post"):
        ActivationDataset(output, "blocks.0.hook_resid_post")


def run_in_progress(output: str, directory: Path, groups: int) -> Path:
    """The output as readers saw it while its run was going: no manifest, `groups` of its commit
    groups recorded (the others' files may already be there)."""
    copy = directory / "in-progress"
    shutil.copytree(output, copy)
    (copy / "manifest.json").unlink()
    for commit in sorted((copy / "_committed").glob("*.json"))[groups:]:
        commit.unlink()
    return copy


def finish(output: str, copy: Path) -> None:
    """The rest of the run lands: its other commits and the manifest."""
    shutil.copytree(Path(output) / "_committed", copy / "_committed", dirs_exist_ok=True)
    shutil.copy(Path(output) / "manifest.json", copy / "manifest.json")


def tokens_of_files(files: list[str]) -> np.ndarray:
    from beam_extract.readers.reader import read_records

    return np.concatenate([r["activations"] for f in files for r in read_records(f)])


@pytest.mark.slow
def test_ranks_plan_over_one_file_list(output, tokens, tmp_path):
    """Issue 26's attack: rank 0 built while some groups are committed, rank 1 after the rest and the
    manifest land. Refused now; through a snapshot both ranks read the snapshot's tokens once."""
    from beam_extract.readers.reader import IncompleteRunWarning, write_snapshot

    commits = len(list((Path(output) / "_committed").glob("*.json")))
    assert commits >= 2
    copy = run_in_progress(output, tmp_path, commits // 2)
    with pytest.raises(ValueError, match="write_snapshot"):
        ActivationDataset(str(copy), HOOK, 256, seed=1, rank=0, world_size=2, shuffle_buffer=0)
    with pytest.warns(IncompleteRunWarning, match="no manifest"):  # one reader alone is warned, not refused
        alone = ActivationDataset(str(copy), HOOK, 256, seed=1)
    write_snapshot(str(copy), str(tmp_path / "plan.json"))
    finish(output, copy)
    with pytest.warns(IncompleteRunWarning, match="no manifest"):  # the snapshot's files are a part of the run
        ranks = [ActivationDataset(str(tmp_path / "plan.json"), HOOK, 256, seed=1, rank=rank, world_size=2,
                                   shuffle_buffer=0) for rank in range(2)]
    assert ranks[0].files == ranks[1].files == alone.files and ranks[0].plan_digest == alone.plan_digest
    per_rank = np.concatenate([torch.cat(drawn(dataset)).numpy() for dataset in ranks])
    assert np.array_equal(as_set(per_rank), as_set(tokens_of_files(alone.files)))
    assert len(per_rank) < len(tokens)  # the snapshot holds a part of the run, every token of it once
    complete = ActivationDataset(str(copy), HOOK, 256, seed=1, rank=1, world_size=2)
    assert complete.files != ranks[0].files and complete.plan_digest != ranks[0].plan_digest
    with pytest.raises(RuntimeError, match="ranks plan over different files"):
        check_same_plan([ranks[0].plan_digest, complete.plan_digest])
    check_same_plan([complete.plan_digest] * 2)


@pytest.mark.slow
def test_ddp_ranks_with_different_plans_all_fail(output, tmp_path):
    """Under torch.distributed (gloo, two processes) the ranks compare their plans' digests: given a
    snapshot and the finished output, both fail loudly instead of training on different tokens."""
    from beam_extract.readers.reader import write_snapshot

    copy = run_in_progress(output, tmp_path, 1)
    write_snapshot(str(copy), str(tmp_path / "plan.json"))
    port = free_port()
    code = f"""
import sys, warnings, torch.distributed as dist
from beam_extract.integrations.pytorch import ActivationDataset, check_same_plan
warnings.simplefilter("ignore")
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=rank, world_size=2)
try:
    ActivationDataset([{str(tmp_path / "plan.json")!r}, {output!r}][rank], {HOOK!r})
except RuntimeError as error:
    print("refused:", error)
"""
    ranks = [subprocess.Popen([sys.executable, "-c", code, str(rank)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for rank in range(2)]
    results = [rank.communicate(timeout=300) for rank in ranks]
    assert all(r.returncode == 0 for r in ranks), [err[-2000:] for _, err in results]
    assert all(out.startswith("refused: ranks plan over different files") for out, _ in results), results


def reconstruction_error(sae, batch: torch.Tensor) -> float:
    with torch.no_grad():
        return (sae(batch) - batch).pow(2).sum(-1).mean().item()




@pytest.mark.slow
@pytest.mark.saelens
@needs_saelens
def test_saelens_trains_from_the_provider(output, tokens):
    from sae_lens import SAETrainer, StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    from beam_extract.integrations.saelens import data_provider

    epoch = list(data_provider(output, HOOK, 256, epochs=1))
    assert len(epoch) == len(tokens) // 256 and all(b.shape == (256, tokens.shape[1]) for b in epoch)
    # Tokens of the output, none twice (identical prompt prefixes of ARC views repeat rows, so by count).
    drawn_rows = Counter(row.tobytes() for row in torch.cat(epoch).numpy())
    assert not drawn_rows - Counter(row.tobytes() for row in tokens)

    torch.manual_seed(0)
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=tokens.shape[1], d_sae=4 * tokens.shape[1],
                                                        l1_coefficient=1e-3))
    untrained, probe = copy.deepcopy(sae), torch.from_numpy(tokens[:2048])
    # Three epochs of the provider: SAETrainer draws past the end of one.
    config = SAETrainerConfig(total_training_samples=256 * len(epoch) * 3, train_batch_size_samples=256, lr=3e-3,
                              lr_end=3e-3)
    trainer = SAETrainer(cfg=config, sae=sae, data_provider=data_provider(output, HOOK, 256))
    trained = trainer.fit()
    assert trainer.n_training_samples == config.total_training_samples
    assert reconstruction_error(trained, probe) < 0.5 * reconstruction_error(untrained, probe)


@pytest.mark.slow
@pytest.mark.saelens
@needs_saelens
def test_converted_activations_train_through_saelens_own_store(output, tokens, tmp_path):
    from sae_lens import ActivationsStore, SAETrainer, StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    from beam_extract.integrations.saelens import to_cached_activations

    ids = np.concatenate([record["token_ids"] for record in read_activations(output, HOOK)])
    rows, d_model = len(tokens) // 128, tokens.shape[1]
    dataset = to_cached_activations(output, HOOK, str(tmp_path / "cached"), context_size=128)
    assert len(dataset) == rows and dataset.column_names == [HOOK, "token_ids"]
    dataset.set_format("numpy")
    written = dataset[:]
    assert np.array_equal(written[HOOK].reshape(-1, d_model), tokens[:rows * 128])
    assert np.array_equal(written["token_ids"].reshape(-1), ids[:rows * 128])
    with pytest.raises(FileExistsError):
        to_cached_activations(output, HOOK, str(tmp_path / "cached"), context_size=128)

    # SAELens reads it as a cache it wrote: its store checks the shapes, then feeds its trainer.
    store = ActivationsStore(model=None, dataset=None, streaming=False, hook_name=HOOK, hook_head_index=None,
                             context_size=128, d_in=d_model, n_batches_in_buffer=4, total_training_tokens=len(tokens),
                             store_batch_size_prompts=8, train_batch_size_tokens=256, prepend_bos=False,
                             normalize_activations="none", device=torch.device("cpu"), dtype="float32",
                             cached_activations_path=str(tmp_path / "cached"))
    torch.manual_seed(0)
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d_model, d_sae=4 * d_model, l1_coefficient=1e-3))
    untrained, probe = copy.deepcopy(sae), torch.from_numpy(tokens[:2048])
    config = SAETrainerConfig(total_training_samples=256 * 150, train_batch_size_samples=256, lr=3e-3,
                              lr_end=3e-3)
    trained = SAETrainer(cfg=config, sae=sae, data_provider=store).fit()
    assert reconstruction_error(trained, probe) < 0.5 * reconstruction_error(untrained, probe)


def readme_snippets() -> list[str]:
    """The python blocks of the README's "Train an SAE from the output" section."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Train an SAE from the output\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def lines_of_code(block: str) -> int:
    return sum(1 for line in block.splitlines() if line.strip())


@pytest.fixture(scope="module")
def output_on_gcs(output, gcs_bucket) -> str:
    """The output uploaded to the GCS emulator, at the README's path but in the emulator's bucket."""
    from google.cloud import storage

    url = README_PATH.replace("gs://my-bucket", gcs_bucket)
    bucket, _, prefix = url.removeprefix("gs://").partition("/")
    client = storage.Client()
    for path in Path(output).rglob("*"):
        if path.is_file():
            client.bucket(bucket).blob(f"{prefix}/{path.relative_to(output).as_posix()}").upload_from_filename(path)
    return url


def run_snippet(code: str, url: str, **replaced: str) -> dict:
    """Runs a README block as written except for the bucket, the layer (the tiny model's output
    has layer 1 only) and what `replaced` shortens."""
    assert README_PATH in code and "blocks.6.hook_resid_post" in code
    code = code.replace(README_PATH, url).replace("blocks.6.hook_resid_post", HOOK)
    for old, new in replaced.items():
        assert old in code
        code = code.replace(old, new)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    return namespace


@pytest.mark.slow
def test_the_readme_pytorch_snippet_trains_from_gcs(output_on_gcs, tokens, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pytorch_block = readme_snippets()[0]
    assert lines_of_code(pytorch_block) <= 10
    ns = run_snippet(pytorch_block, output_on_gcs)
    assert ns["acts"].d_model == tokens.shape[1] and np.isfinite(ns["loss"].item())


@pytest.mark.slow
@pytest.mark.saelens
@needs_saelens
def test_the_readme_saelens_snippets_train_and_convert_from_gcs(output_on_gcs, tokens, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, trainer_block, convert_block = readme_snippets()
    assert lines_of_code(trainer_block) <= 10
    torch.manual_seed(0)
    started = time.perf_counter()
    ns = run_snippet(trainer_block, output_on_gcs, **{"200_000_000": "4096 * 200"})
    print(f"trained in {time.perf_counter() - started:.0f} s")
    sae, width = ns["sae"], tokens.shape[1]
    assert sae.cfg.d_in == width
    # Sensible on the tiny model's tokens, scaled as the manifest says: sparse (SAELens's default
    # l1_coefficient left L0 at ~210 of 64) and reconstructing better than the tokens' mean.
    probe = torch.from_numpy(tokens[:4096]) * ns["scale"]
    with torch.no_grad():
        latents = sae.encode(probe)
        unexplained = (sae.decode(latents) - probe).pow(2).sum() / (probe - probe.mean(0)).pow(2).sum()
    l0 = (latents > 0).float().sum(-1).mean()
    print(f"L0 {l0:.1f} of {width}, unexplained {unexplained:.3f}")
    assert l0 < 0.75 * width and unexplained < 0.7
    from sae_lens import StandardTrainingSAE

    saved = StandardTrainingSAE.load_from_disk(str(tmp_path / "sae" / HOOK))
    assert torch.equal(saved.W_dec, sae.W_dec)
    run_snippet(convert_block, output_on_gcs)
    from datasets import load_from_disk

    assert len(load_from_disk(str(tmp_path / "cached/fineweb-q05b"))) == len(tokens) // 128


def test_paired_hooks_through_the_dataset_and_the_saelens_provider(tmp_path):
    """Two ranks of a dataset over (mlp_in, mlp_out) read every token once between them, each token's
    rows at both hooks in the same batch row; stacked where the widths agree; a file whose records
    are in another order fails the alignment check."""
    from test_output_schema import write_paired_output

    from beam_extract.integrations.saelens import data_provider
    from beam_extract.readers.reader import MisalignedHooks

    (tmp_path / "a").mkdir()
    paired, tokens = write_paired_output(tmp_path / "a")
    ranks = [drawn(ActivationDataset(str(tmp_path / "a"), hooks=paired, batch_tokens=4, seed=1, rank=rank,
                                     world_size=2)) for rank in range(2)]
    batches = ranks[0] + ranks[1]
    assert ActivationDataset(str(tmp_path / "a"), hooks=paired).widths == [3, 5]
    assert all(len(b) == 2 and b[0].shape[1] == 3 and b[1].shape[1] == 5 for b in batches)
    first, second = (torch.cat([b[i] for b in batches]).numpy() for i in range(2))
    np.testing.assert_array_equal(first[:, :2], second[:, :2])
    assert sorted(tuple(map(int, row)) for row in first[:, :2]) == sorted(tokens)
    provided = list(itertools.islice(data_provider(str(tmp_path / "a"), None, 4, hooks=paired, epochs=1), 100))
    assert len(provided) == len(tokens) // 4 and all(len(b) == 2 and b[0].shape == (4, 3) for b in provided)

    (tmp_path / "b").mkdir()
    hooks, _ = write_paired_output(tmp_path / "b", widths=(4, 4))
    stacked = drawn(ActivationDataset(str(tmp_path / "b"), hooks=hooks, batch_tokens=4, stack=True))
    assert all(b.shape[1:] == (2, 4) for b in stacked)
    with pytest.raises(ValueError, match="cannot be stacked"):
        ActivationDataset(str(tmp_path / "a"), hooks=paired, stack=True)

    (tmp_path / "c").mkdir()
    hooks, _ = write_paired_output(tmp_path / "c", shuffle_hook="blocks.0.hook_mlp_out")
    with pytest.raises(MisalignedHooks):
        drawn(ActivationDataset(str(tmp_path / "c"), hooks=hooks, batch_tokens=4))
