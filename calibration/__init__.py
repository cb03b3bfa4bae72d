"""Calibration: step inputs from real denoising trajectories, the INT8 recipes and the accuracy gate.

Installed as `bard_deploy.calibration`. It uses the runtimes (to decode trajectories, to gate the INT8 graph)
and never the converters or training code.
"""
