"""`python -m examples.matting --help`"""
import sys

from .train import main

sys.exit(main())
