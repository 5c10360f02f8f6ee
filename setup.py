"""mtbi-fast: kernel-backed MTBI trainer for speech LLMs.

The Triton kernels live in ``kernels/mtbi_kernels/`` and install as ``mtbi_kernels``. ``kernels/``
itself holds no ``__init__.py``: a package named ``kernels`` at the repository root would shadow the
PyPI package of that name (a dependency of transformers >= 5.25) whenever the root is on sys.path.
"""

from pathlib import Path

from setuptools import setup

here = Path(__file__).parent
version = {}
exec((here / "mtbi_fast" / "version.py").read_text(), version)

setup(
    name="mtbi-fast",
    version=version["__version__"],
    description="Multi-task behavior imitation (MTBI) for speech LLMs, with fused Triton kernels "
                "and DeepSpeed ZeRO-3",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["mtbi_fast", "mtbi_fast.hf_code", "mtbi_kernels"],
    package_dir={"mtbi_fast": "mtbi_fast", "mtbi_kernels": "kernels/mtbi_kernels"},
    package_data={"mtbi_fast": ["assets/*.json"]},
    install_requires=[
        "torch>=2.4",
        "torchaudio>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "transformers>=5,<6",
        "deepspeed>=0.19,<0.20",
        "numpy",
        "soundfile",
        "tqdm",
        "pyyaml",
        "safetensors",
        "sacrebleu",     # mtbi-fast eval: chrF
        "jiwer",         # mtbi-fast eval: WER
        "rouge-score",   # mtbi-fast eval: the standard ROUGE-L (tokenizer, Porter stemmer)
        "whisper-normalizer",  # mtbi-fast eval: the English spelling mapping of Whisper's normalizer
        "tensorboard",   # train.report_to: [tensorboard], the default tracker
        "matplotlib",    # plots (PNG)
        "gguf",          # mtbi-fast models fetch: the GGUF SmolLM2
        "accelerate",
        "lhotse>=1.30",  # CutSet manifests in and out (mtbi_fast.lhotse_io)
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-benchmark>=4", "psutil", "jiwer", "peft>=0.13",
                "pocketsphinx>=5", "piper-tts>=1.3", "onnx", "onnxruntime",
                "liger-kernel>=0.8",  # the loss's peer: its chunked JSD at beta 0 is our KL
                "wandb", "fastapi", "uvicorn", "huggingface_hub"],  # tracking, serve, export tests
        "align": ["pocketsphinx>=5"],
        "corpus": ["piper-tts>=1.3", "onnx", "onnxruntime"],  # mtbi-fast corpus build: Piper's voice
        "flash": ["flash-attn>=2.6"],
        "lora": ["peft>=0.13"],
        "tracking": ["wandb"],                    # train.report_to: [wandb]
        "serve": ["fastapi", "uvicorn"],          # mtbi-fast serve
    },
    entry_points={"console_scripts": ["mtbi-fast = mtbi_fast.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
