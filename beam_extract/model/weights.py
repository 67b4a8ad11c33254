"""Finds a checkpoint (embedded name, local dir, gs:// dir or hub id) and loads its safetensors.

Only safetensors are read: loading never unpickles or executes anything from the checkpoint.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from beam_extract import gcs
from beam_extract.model import embedded
from beam_extract.model.checkpoint_tensors import expected_shapes, stored_params
from beam_extract.model.config import ModelConfig
from beam_extract.model.families import FAMILIES

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# The files of a model directory we use; anything else (pickles, remote code) is never fetched.
METADATA_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                  "special_tokens_map.json", "chat_template.jinja", "chat_template.json", "generation_config.json")
WEIGHT_FILES = ("*.safetensors", INDEX_FILE)
# Floating-point weights only: int8 and friends would need their quantisation scales, which we do not apply.
STORED_DTYPES = ("BF16", "F16", "F32")

class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, or does not match its config."""


def cache_dir() -> Path:
    return Path(os.environ.get("BEAM_EXTRACT_CACHE", Path.home() / ".cache" / "beam_extract"))


def resolve_model_dir(path_or_name: str, weights: bool = True) -> Path:
    """A local directory holding config.json and the tokenizer (and, if `weights`, the safetensors)."""
    patterns = METADATA_FILES + (WEIGHT_FILES if weights else ())
    if path_or_name in embedded.EMBEDDED_MODELS:
        return embedded.ensure_embedded_model(path_or_name, cache_dir())
    if path_or_name.startswith("gs://"):
        return _copy_remote_dir(path_or_name, patterns)
    local = Path(path_or_name).expanduser()
    if local.is_dir():
        return local
    if local.exists() or path_or_name.startswith((".", "/", "~")):
        raise CheckpointError(f"model path {path_or_name!r} is not a directory")
    return _download_from_hub(path_or_name, patterns)


def _copy_remote_dir(url: str, patterns: tuple[str, ...]) -> Path:
    """Copies the matching files of a gs:// directory into the local cache. A cached file is used
    again only if it came from the same object generation with the same CRC32C (recorded beside
    it): new weights of the same size replace it."""
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    base = url.rstrip("/")
    target = cache_dir() / "remote" / hashlib.sha256(base.encode()).hexdigest()[:16]
    listing = gcs.list_directory(base)
    files = {blob.name.rsplit("/", 1)[-1]: f"{blob.generation}:{blob.crc32c}" for blob in listing
             if any(fnmatch.fnmatchcase(blob.name.rsplit("/", 1)[-1], pattern) for pattern in patterns)}
    if "config.json" not in files:
        raise CheckpointError(f"no config.json under {url}")
    target.mkdir(parents=True, exist_ok=True)
    for name, identity in sorted(files.items()):
        local, stamp = target / name, target / f".{name}.source"
        if local.exists() and stamp.exists() and stamp.read_text() == identity:
            continue
        partial = local.with_name(f".{name}.{os.getpid()}.partial")
        with FileSystems.open(f"{base}/{name}", compression_type=CompressionTypes.UNCOMPRESSED) as src, \
                open(partial, "wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
        os.replace(partial, local)  # atomic: concurrent workers never see half a file
        written = stamp.with_name(f"{stamp.name}.{os.getpid()}.partial")
        written.write_text(identity)
        os.replace(written, stamp)
    return target


def _download_from_hub(repo_id: str, patterns: tuple[str, ...]) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=list(patterns)))
    except Exception as error:  # the hub client raises many types; the user needs the cause and the id
        raise CheckpointError(f"model {repo_id!r} is not a local directory and could not be fetched "
                              f"from the Hugging Face hub: {error}") from error


def checkpoint_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> file holding it, from the shard index or the single file."""
    index = model_dir / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text("utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError, RecursionError) as error:
            raise CheckpointError(f"{index} is not a shard index with a weight_map: {error!r}"[:300]) from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map must map tensor names to file names")
        root = model_dir.resolve()
        files = {}
        for name, file in weight_map.items():
            path = (model_dir / file).resolve()
            if path.parent != root:  # no ../, no absolute path, no subdirectory: only the model's own files
                raise CheckpointError(f"{index}: {name!r} names {file!r}, outside the model directory")
            files[name] = path
        return files
    single = model_dir / SINGLE_FILE
    if not single.exists():
        raise CheckpointError(f"{model_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}")
    try:
        with safe_open(str(single), "np") as handle:
            return {name: single for name in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"cannot read {single}: {error}") from error


def _unused(config: ModelConfig, key: str) -> bool:
    family = FAMILIES[config.family]
    return any(fnmatch.fnmatchcase(key, f"{family.layers}.*.{pattern}") for pattern in family.unused)


def check_checkpoint(config: ModelConfig, model_dir: Path) -> dict[Path, list[str]]:
    """Every tensor we read, by file, checked from the files' headers alone (names, dtypes, shapes,
    nothing missing): a checkpoint we cannot use fails here, in the driver, as a CheckpointError."""
    expected = expected_shapes(config)
    prefix = FAMILIES[config.family].prefix
    # The LM head is never used (no logits are computed), but a present one must still be well-formed.
    optional = {} if config.tie_word_embeddings else {"lm_head.weight": (config.vocab_size, config.hidden_size)}
    by_file: dict[Path, list[str]] = {}
    for name, path in checkpoint_files(model_dir).items():
        by_file.setdefault(path, []).append(name)
    wanted: dict[Path, list[str]] = {}
    found = set()
    for path, names in sorted(by_file.items()):
        try:
            with safe_open(str(path), "np") as handle:
                available = set(handle.keys())
                for name in names:
                    key = name.removeprefix(prefix)
                    if _unused(config, key):
                        continue
                    if key not in expected and key not in optional:
                        raise CheckpointError(f"unexpected tensor {name!r} in {path.name}")
                    if name not in available:
                        raise CheckpointError(f"tensor {name!r} is indexed in {path.name} but not stored there")
                    stored = handle.get_slice(name)
                    if stored.get_dtype() not in STORED_DTYPES:
                        raise CheckpointError(f"tensor {name!r} is stored as {stored.get_dtype()}; only "
                                              f"{', '.join(STORED_DTYPES)} weights are read")
                    shape = tuple(stored.get_shape())
                    want = expected.get(key) or optional[key]
                    if shape != want:
                        raise CheckpointError(f"tensor {name!r} has shape {shape}, config implies {want}")
                    if key in expected:
                        if key in found:
                            raise CheckpointError(f"tensor {key!r} is stored twice (with and without {prefix!r})")
                        wanted.setdefault(path, []).append(name)
                        found.add(key)
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"cannot read {path}: {error}") from error
    missing = [key for key in expected if key not in found]
    if missing:
        raise CheckpointError(f"missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    return wanted


def _read_tensors(config: ModelConfig, model_dir: Path) -> dict[str, np.ndarray]:
    prefix = FAMILIES[config.family].prefix
    tensors = {}
    for path, names in check_checkpoint(config, model_dir).items():
        try:
            with safe_open(str(path), "np") as handle:
                for name in names:
                    tensors[name.removeprefix(prefix)] = handle.get_tensor(name)
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"cannot read {path}: {error}") from error
    return tensors


def load_params(config: ModelConfig, model_dir: Path, dtype: np.dtype) -> dict:
    """The parameter pytree: layer weights stacked on a leading layer axis, linears as [in, out],
    fused tensors split into ours."""
    tensors = _read_tensors(config, model_dir)
    params: dict = {"layers": {}}
    per_layer: dict[str, list[np.ndarray]] = {}
    for name, index, stored, key in stored_params(config):
        # Each checkpoint tensor is let go once read (the last part of a fused one): host memory holds
        # about one copy of the weights, not two.
        tensor = tensors.pop(key) if stored.part == stored.parts - 1 else tensors[key]
        if stored.parts > 1:
            tensor = np.split(tensor, stored.parts, axis=-1)[stored.part]
        tensor = (tensor.T if stored.transpose else tensor).astype(dtype)
        if index is None:
            params[name] = tensor
        else:
            per_layer.setdefault(name, []).append(tensor)
    params["layers"] = {name: np.stack(stack) for name, stack in per_layer.items()}
    return params


def remote_weights_checksum(url: str) -> str:
    """sha256 over the name, size and CRC32C of each weight object of a gs:// model: its identity
    without downloading it (a Dataflow launcher need not hold the weights)."""
    digest = hashlib.sha256()
    for blob in sorted(gcs.list_directory(url), key=lambda blob: blob.name):
        name = blob.name.rsplit("/", 1)[-1]
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in WEIGHT_FILES):
            digest.update(f"{name}|{blob.size}|{blob.crc32c}\n".encode())
    return digest.hexdigest()


def weights_checksum(model_dir: Path) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order.

    It identifies the weights, not the files: a sharded and a single-file copy agree.
    """
    digest = hashlib.sha256()
    for name, path in sorted(checkpoint_files(model_dir).items()):
        try:
            with safe_open(str(path), "np") as handle:
                tensor = handle.get_tensor(name)
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"cannot read {path}: {error}") from error
        digest.update(f"{name}|{tensor.dtype}|{tensor.shape}|".encode())
        digest.update(np.ascontiguousarray(tensor).reshape(-1).view(np.uint8))  # its bytes, not copied
    return digest.hexdigest()
