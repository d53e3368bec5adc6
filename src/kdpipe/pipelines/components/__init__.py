"""Kubeflow Pipelines components: one file per pipeline step.

Each is a lightweight ``@dsl.component`` running in the kdpipe image (:func:`kdpipe.orchestration.kubeflow.image`)
that validates its parameters with :mod:`kdpipe.core.params` and calls ``kdpipe.steps.<step>.run``:
the steps have a single implementation, shared with the CLI and ``dvc repro``. KFP ships only the
function body to the cluster, so every import sits inside it.
"""

from .augment import augment
from .data import data
from .distill import distill
from .evaluate import evaluate
from .export import export
from .prepare import prepare
from .register import register
from .select import select
from .teacher import teacher

__all__ = ["augment", "data", "distill", "evaluate", "export", "prepare", "register", "select", "teacher"]
