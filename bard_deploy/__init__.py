"""bard-deploy: Qwen3-VL -> BARD block-diffusion VLMs, exported and run on edge hardware."""

__version__ = "0.1.0"
