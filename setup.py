"""megatron_fp4: fully-quantized NVFP4 pretraining for Megatron-Core (Quartet II, TetraJet-v2, NVIDIA)."""
from setuptools import setup

setup(
    name="megatron_fp4",
    version="0.1.0",
    description="NVFP4 (4-bit) linear layers and recipes for Megatron-Core pretraining",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.12",
    # The product layout keeps kernels/, patches/ and recipes/ at the top level; they install as
    # subpackages of megatron_fp4 so that nothing generic like `kernels` lands in site-packages.
    packages=["megatron_fp4", "megatron_fp4.data", "megatron_fp4.megatron", "megatron_fp4.testing",
              "megatron_fp4.kernels", "megatron_fp4.patches", "megatron_fp4.recipes"],
    package_dir={
        "megatron_fp4": "megatron_fp4",
        "megatron_fp4.kernels": "kernels",
        "megatron_fp4.patches": "patches",
        "megatron_fp4.recipes": "recipes",
    },
    package_data={"megatron_fp4.recipes": ["*.yaml"]},
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.19,<0.20",
        "triton",
        "pyyaml",
    ],
    entry_points={"console_scripts": ["megatron-fp4-pretrain=megatron_fp4.pretrain_gpt:cli"]},
    extras_require={
        # tokenizers: the quality campaign's BPE corpus (data/tokenizer.py), also needed by its tests
        "test": ["pytest", "pytest-timeout", "hypothesis", "psutil", "tokenizers"],
        "plot": ["matplotlib"],
        "quality": ["tokenizers", "matplotlib"],
    },
)
