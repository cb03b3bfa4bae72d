"""Converters: HF <-> bard checkpoints (one key map); ONNX export and validation; TensorRT engines.

Installed as `bard_deploy.converters`; always import it by that name.
"""
