"""Calibration: decoder inputs from real denoising trajectories, and the INT8 recipes.

Installed as `bard_deploy.calibration`.
"""
