"""Converters: a checkpoint -> ONNX graphs, validated against PyTorch, quantized, with a manifest; TensorRT engines
are built from them by the tensorrt backend.

Installed as `bard_deploy.converters`; always import it by that name. It may use the runtimes and calibration;
nothing below it imports it. (Reading and writing checkpoints, the HF key map, is core: `bard_deploy.checkpoint`.)
"""
