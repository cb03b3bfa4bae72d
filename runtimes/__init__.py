"""Runtimes: the KV buffer, the denoising loop (written once) and its backends (torch, onnxruntime, TensorRT).

Installed as `bard_deploy.runtimes`; it must not import training code.
"""
