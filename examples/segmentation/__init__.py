"""Segmentation on synthetic scenes: what the decoder's upsampler does near boundaries.

Run `python -m examples.segmentation --help` from the repository root.
"""
