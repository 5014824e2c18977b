"""`python -m examples.segmentation --help`"""
import sys

from .train import main

sys.exit(main())
