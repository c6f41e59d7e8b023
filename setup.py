"""mindspore_llm: LLM training, fine-tuning and checkpoint conversion with MindSpore for Ascend NPUs."""
from setuptools import find_packages, setup

setup(
    name="mindspore_llm",
    version="0.1.0",
    description="Train and fine-tune Qwen2/2.5/3 and DeepSeek-V3/R1 with MindSpore on Ascend; convert HF checkpoints",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mindspore_llm", "mindspore_llm.*", "ckpt_tools", "ckpt_tools.*"]),
    # the tiny tokenizer and data sets `scripts/make_tiny_assets.py` writes, shipped for the from-scratch demo
    package_data={"mindspore_llm": ["assets/tiny/*"]},
    # Tested with mindspore 2.10.0 (PyPI, CPU target) on Python 3.11.
    install_requires=[
        "mindspore>=2.10,<2.11",
        # mindspore 2.10's PyPI wheel is built against NumPy 1.x: with NumPy 2 its eager (PyNative) ops fail.
        "numpy>=1.25,<2",
        "pyyaml",
        "click>=8",
        "sentencepiece",
        "tokenizers",
        "safetensors",
        "jinja2",
        "tqdm",
        "isal",  # ISA-L's CRC32 for the conversion manifests: zlib's checksum, 4-5x faster than zlib.crc32
        "tensorboardX",  # TensorBoard event files of training metrics (pure Python)
        "matplotlib",  # the loss-curve PNG at the end of training
        "math-verify>=0.9,<1",  # math_accuracy: Hugging Face's answer grader (sympy), offline, as open-r1 and TRL grade
    ],
    extras_require={
        # The reference implementation for parity tests. torch is pinned exactly: 2.13.0 is the CPU wheel here,
        # any other version would pull a multi-GB CUDA build. Parity tests were run with transformers 5.23.
        # bitsandbytes: the QLoRA reference (NF4 quantize/dequantize, BitsAndBytesConfig models), run on the CPU;
        # 0.50 is the first release whose CPU backend runs them (tests/test_qlora.py was run with 0.50.2).
        "test": ["pytest", "torch==2.13.0", "transformers>=5.0,<6", "peft", "bitsandbytes>=0.50,<0.51"],
    },
    entry_points={
        "console_scripts": [
            "msllm=mindspore_llm.cli:main",
            "msllm-ckpt=ckpt_tools.cli:main",
        ],
    },
)
