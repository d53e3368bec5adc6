"""kdpipe: train small, fast image classifiers from a few labeled and many unlabeled images.

Every pipeline step lives in :mod:`kdpipe.steps` and is the only implementation of that step; the
CLI (and so DVC), the Kubeflow components and Python callers all call the same functions.
"""

__version__ = "0.1.0"
