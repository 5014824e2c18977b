"""Image matting on synthetic mattes: what the decoder's upsampler does to soft edges and
hair-like strands. Run `python -m examples.matting --help` from the repository root.
"""
