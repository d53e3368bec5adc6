"""The Kubeflow component of a step that has no hand-written one, made from its catalog entry.

Its inputs are the artifacts the step reads (named as the catalog's :meth:`Step.inputs` says), its
params groups as ``<group>_params`` dicts and the run context; its output is the step's ``out_dir``
and a ``summary`` of the numbers the step returns. KFP ships a component's source to the cluster,
so the function is written out as source (registered with :mod:`linecache`, where ``inspect``
finds it) rather than built as a closure. The hand-written components add KFP artifacts of their
own (a confusion matrix, an HTML page...) and are checked against the catalog by tests.
"""

from __future__ import annotations

import linecache

from kfp import dsl
from kfp.dsl import Artifact, Input, Metrics, Output

from kdpipe.core.catalog import Step
from kdpipe.orchestration.kubeflow import image

_TEMPLATE = '''def {name}(
{inputs}
{groups}
    {output}: Output[Artifact],
    summary: Output[Metrics],
    execution_key: str = "",
    git_commit: str = "",
):
    """{summary}"""
    from kdpipe.pipelines.components.from_catalog import run_task

    run_task(
        "{name}",
        {{{paths}}},
        {{{params}}},
        {output}.path,
        summary,
        execution_key,
        git_commit,
    )
'''


def param_groups(step: Step) -> list[str]:
    return [group for group in step.param_groups if group != "data"]  # data arrives as an artifact


def component_source(step: Step) -> str:
    """The component function's source for ``step``."""
    inputs = step.inputs()
    return _TEMPLATE.format(
        name=step.name,
        summary=step.summary.replace('"', "'"),
        inputs="\n".join(f"    {artifact}: Input[Artifact]," for artifact in dict.fromkeys(inputs.values())),
        groups="\n".join(f"    {group}_params: dict," for group in param_groups(step)),
        output=step.output,
        paths=", ".join(f'"{arg}": {artifact}.path' for arg, artifact in inputs.items()),
        params=", ".join(f'"{group}": {group}_params' for group in param_groups(step)),
    )


def catalog_component(step: Step):
    """``step``'s lightweight component, in the kdpipe image like every other."""
    source = component_source(step)
    filename = f"<kdpipe component {step.name}>"
    # mtime None: linecache.checkcache keeps the entry (there is no file to compare with)
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {"Artifact": Artifact, "Input": Input, "Metrics": Metrics, "Output": Output}
    # dont_inherit: this module's `from __future__ import annotations` would turn the annotations
    # into strings, which KFP cannot read
    exec(compile(source, filename, "exec", dont_inherit=True), namespace)
    return dsl.component(base_image=image(), install_kfp_package=False)(namespace[step.name])


def run_task(
    name: str,
    paths: dict[str, str],
    groups: dict[str, dict],
    out_dir: str,
    summary,
    execution_key: str,
    git_commit: str,
) -> None:
    """What the component does on the cluster: the step through the runner (MLflow as for any
    step), then the numbers it returned logged to ``summary``."""
    from kdpipe.orchestration import kubeflow
    from kdpipe.steps.catalog import run_step

    params = kubeflow.params_from(**groups)
    track = kubeflow.tracking_for_task(execution_key, git_commit)
    result = run_step(name, params, track=track, **paths, out_dir=out_dir)
    if isinstance(result, dict):
        kubeflow.log_numbers(summary, result)
