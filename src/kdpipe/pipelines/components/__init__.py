"""Kubeflow Pipelines components: one per pipeline step.

Each is a lightweight ``@dsl.component`` running in the kdpipe image (:func:`kdpipe.orchestration.kubeflow.image`)
that validates its parameters with :mod:`kdpipe.core.params` and runs the step through
:func:`kdpipe.steps.catalog.run_step`: the steps have a single implementation, shared with the CLI and
``dvc repro``. KFP ships only the function body to the cluster, so every import sits inside it. A
step without a file here gets a component made from its catalog entry (:mod:`.from_catalog`).
"""

from kdpipe.core.catalog import STEPS

from .augment import augment
from .data import data
from .distill import distill
from .evaluate import evaluate
from .export import export
from .from_catalog import catalog_component
from .prepare import prepare
from .register import register
from .select import select
from .teacher import teacher

# the steps whose component adds KFP artifacts of its own (metadata, plots, the gate's number)
HAND_WRITTEN = {c.name: c for c in (prepare, teacher, augment, distill, select, export, evaluate, register)}


def step_components() -> dict:
    """Every catalog step's component, in the catalog's order."""
    return {name: HAND_WRITTEN.get(name) or catalog_component(step) for name, step in STEPS.items()}


__all__ = ["HAND_WRITTEN", "data", "step_components"]
