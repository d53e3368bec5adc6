"""Component: materialize a DVC revision of the data folder (``kdpipe.steps.fetch``)."""

from kfp import dsl
from kfp.dsl import Dataset, Output

from kdpipe.orchestration.kubeflow import image


@dsl.component(base_image=image(), install_kfp_package=False)
def data(
    repo: str,
    rev: str,
    data_version: str,
    data_root: str,
    dvc_remote: str,
    dvc_remote_config: dict,
    raw_data: Output[Dataset],
):
    """``rev`` and ``data_version`` are inputs, so they are part of KFP's cache key: a cached result
    is reused only for the same repository, revision and data version."""
    from kdpipe.core.errors import KdpipeError
    from kdpipe.orchestration import kubeflow
    from kdpipe.steps import fetch as step

    if not data_version.strip():
        raise KdpipeError(
            "data_version is empty: name the data version (it keys KFP's cache), "
            "e.g. the commit of rev or a dataset tag"
        )
    params = kubeflow.params_from(data={"root": data_root})
    info = step.run(params, raw_data.path, repo, rev, dvc_remote, dvc_remote_config)
    raw_data.metadata.update(
        {"data_version": data_version, "rev": rev, "commit": info["commit"], "files": info["files"]}
    )
