"""The GitHub workflows: what reaches which step. Secrets are given per step (never to the whole
job), retraining runs on the default branch only, and its local result comes back as a pull request."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _workflow(name: str) -> dict:
    data = yaml.safe_load((ROOT / ".github" / "workflows" / name).read_text(encoding="utf-8"))
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as True
    return data


def _secrets(value) -> set[str]:
    return set(re.findall(r"secrets\.([A-Z_]+)", str(value)))


def evaluate_expression(expression: str, github: dict, secrets: dict | None = None) -> object:
    """A GitHub Actions ``${{ }}`` expression of the kinds the workflows use (``==``, ``!=``, ``||``,
    ``&&``, ``format()``, string literals, ``github.*`` and ``secrets.*`` contexts), evaluated on
    ``github`` and ``secrets``; a missing property (an unset secret) is ``''`` (falsy, as in Actions)."""
    body = expression.strip().removeprefix("${{").removesuffix("}}").strip()

    class Missing(str):  # '' that still answers property access, like a missing context value
        def __getattr__(self, name):
            return Missing()

    class Context(dict):
        def __getattr__(self, name):
            value = self.get(name, Missing())
            return Context(value) if isinstance(value, dict) else value

    def fmt(template: str, *args) -> str:
        return re.sub(r"\{(\d+)\}", lambda m: str(args[int(m[1])]), template)

    python = body.replace("||", " or ").replace("&&", " and ").replace("format(", "fmt(")
    assert re.fullmatch(r"[\w.'{}()\[\]/ ,=!-]*", python), f"unsupported expression: {body}"
    names = {"github": Context(github), "secrets": Context(secrets or {}), "fmt": fmt}
    return eval(python, {"__builtins__": {}}, names)  # noqa: S307 (a test's own workflow file)


# what GitHub puts in the context for each event (the schedule event has no repository object)
EVENTS = {
    "push to main": {
        "event_name": "push",
        "ref": "refs/heads/main",
        "event": {"repository": {"default_branch": "main"}},
    },
    "schedule": {"event_name": "schedule", "ref": "refs/heads/main", "event": {"schedule": "17 3 * * 1"}},
    "dispatch on main": {
        "event_name": "workflow_dispatch",
        "ref": "refs/heads/main",
        "event": {"repository": {"default_branch": "main"}},
    },
    "dispatch on a branch": {
        "event_name": "workflow_dispatch",
        "ref": "refs/heads/feature",
        "event": {"repository": {"default_branch": "main"}},
    },
}


def test_retrain_runs_on_the_default_branch_for_push_schedule_and_dispatch_only():
    flow = _workflow("retrain.yml")
    assert flow["on"]["push"]["branches"] == ["main"] and "schedule" in flow["on"]
    condition = flow["jobs"]["retrain"]["if"]
    runs = {event: bool(evaluate_expression(condition, github)) for event, github in EVENTS.items()}
    assert runs == {
        "push to main": True,
        "schedule": True,
        "dispatch on main": True,
        "dispatch on a branch": False,
    }


def test_the_expression_evaluator_reads_missing_properties_as_empty():
    old_condition = "${{ github.ref == format('refs/heads/{0}', github.event.repository.default_branch) }}"
    assert evaluate_expression(old_condition, EVENTS["schedule"]) is False  # why the schedule was skipped
    assert evaluate_expression(old_condition, EVENTS["push to main"]) is True


def test_retrain_gives_each_secret_only_to_the_steps_that_need_it():
    job = _workflow("retrain.yml")["jobs"]["retrain"]
    # the job-level environment holds booleans only ("is it set?"), never a secret's value
    assert all(re.fullmatch(r"\$\{\{ secrets\.[A-Z_]+ != '' \}\}", v) for v in job["env"].values())
    steps = {s["name"]: s for s in job["steps"] if "name" in s}
    assert _secrets(steps["retrain"]["env"]) >= {
        "KFP_TOKEN",
        "KDPIPE_KFP_HOST",
        "AWS_ACCESS_KEY_ID",
        "MLFLOW_TRACKING_URI",
    }
    assert "KDPIPE_KFP_NAMESPACE" in steps["retrain"]["env"] and "KDPIPE_IMAGE" in steps["retrain"]["env"]
    assert _secrets(steps["DVC remote from the secrets"]["env"]) == {"DVC_REMOTE_URL", "DVC_REMOTE_ENDPOINT"}
    assert _secrets(steps[PR_STEP]) == {"RETRAIN_TOKEN"}  # the token its pull request is opened with
    for name, step in steps.items():
        if name not in ("retrain", "DVC remote from the secrets", PR_STEP):
            assert not _secrets(step), f"step {name!r} sees secrets"


PR_STEP = "pull request with the new dvc.lock and the metrics diff"


def test_the_kubeflow_path_gets_both_images_the_cluster_settings_and_a_bounded_wait():
    job = _workflow("retrain.yml")["jobs"]["retrain"]
    step = {s["name"]: s for s in job["steps"] if "name" in s}["retrain"]
    assert step["env"]["KDPIPE_IMAGE"] == "${{ vars.KDPIPE_IMAGE }}"
    assert step["env"]["KDPIPE_GPU_IMAGE"] == "${{ vars.KDPIPE_GPU_IMAGE }}"
    # the committed cluster settings unless the repository names another file
    assert step["env"]["KDPIPE_CLUSTER_FILE"] == "${{ vars.KDPIPE_CLUSTER_FILE || 'cluster.yaml' }}"
    assert step["env"]["KDPIPE_PIPELINE_VERSION"] == "${{ vars.KDPIPE_PIPELINE_VERSION }}"
    # retrain's own timeout ends first, with its one line naming the run, before the job is killed
    wait = int(re.search(r"--wait-timeout (\d+)", step["run"])[1])
    assert wait < job["timeout-minutes"] * 60 <= 6 * 3600  # a GitHub-hosted job's limit
    # the options the step relies on exist, and read the variables it sets
    from kdpipe.cli import build_parser

    args = build_parser().parse_args(["retrain", "--wait-timeout", str(wait)])
    assert args.wait_timeout == wait
    from kdpipe.orchestration import retrain

    assert {retrain.CLUSTER_FILE_ENV, retrain.PIPELINE_VERSION_ENV, retrain.KFP_HOST_ENV} <= set(step["env"])


def test_both_paths_open_a_pull_request_with_the_new_lock_file_or_reports():
    job = _workflow("retrain.yml")["jobs"]["retrain"]
    assert job["permissions"] == {"contents": "write", "pull-requests": "write"}
    steps = {s["name"]: s for s in job["steps"] if "name" in s}
    pr = steps[PR_STEP]
    assert "if" not in pr  # a cluster run's reports come back too (kdpipe retrain writes them)
    assert "git add dvc.lock reports" in pr["run"] and "gh pr create" in pr["run"]
    assert "--body-file retrain-summary.md" in pr["run"]  # the metrics diff is the PR's description
    assert steps["venv cache"]["with"]["path"] == ".venv"
    assert "TORCH_CPU_INDEX" in steps["set up (venv with CPU-only torch, DVC config)"]["run"]


def test_the_pull_request_is_opened_with_a_token_whose_events_start_ci():
    """Events caused by the workflow's own token start no workflow: its pull request would get no
    CI. RETRAIN_TOKEN (a fine-grained token or a GitHub App's) is used when set, for the push too."""
    pr = {s["name"]: s for s in _workflow("retrain.yml")["jobs"]["retrain"]["steps"] if "name" in s}[PR_STEP]
    github = {**EVENTS["push to main"], "token": "ghs_workflow"}
    token = pr["env"]["GH_TOKEN"]
    assert evaluate_expression(token, github, {"RETRAIN_TOKEN": "github_pat_x"}) == "github_pat_x"
    assert evaluate_expression(token, github) == "ghs_workflow"  # unset: the fallback, without CI
    script = pr["run"]
    assert script.index("gh auth setup-git") < script.index("git push")  # git pushes with GH_TOKEN
    assert "gh pr create" in script


def test_the_pull_request_step_sees_new_report_files_as_a_change(tmp_path):
    """Its "nothing changed" check, run in a throw-away repository: a report file the base commit
    lacks (a cluster run's reports may include one) is untracked, which `git diff` does not see."""
    import subprocess

    pr = {s["name"]: s for s in _workflow("retrain.yml")["jobs"]["retrain"]["steps"] if "name" in s}[PR_STEP]
    check = next(line for line in pr["run"].splitlines() if "nothing changed" in line)

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "old.json").write_text("{}")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "base")

    def outcome() -> str:
        done = subprocess.run(
            ["bash", "-c", f"{check}\necho go on"], cwd=tmp_path, capture_output=True, text=True, check=True
        )
        return done.stdout.strip()

    assert outcome() == "nothing changed"
    (tmp_path / "reports" / "new.json").write_text("{}")
    assert outcome() == "go on"


def test_release_compiles_the_pipeline_against_the_pushed_images_by_digest():
    flow = _workflow("release.yml")
    assert flow["on"]["push"]["tags"] == ["v*"]
    images = {s.get("id"): s for s in flow["jobs"]["images"]["steps"]}
    assert images["cpu"]["with"]["target"] == "cpu" and images["gpu"]["with"]["target"] == "gpu"
    assert images["cpu"]["with"]["push"] is True and "TORCH_INDEX_URL" in images["cpu"]["with"]["build-args"]
    assert flow["jobs"]["images"]["outputs"] == {
        "cpu": "${{ steps.cpu.outputs.digest }}",
        "gpu": "${{ steps.gpu.outputs.digest }}",
    }
    steps = {s["name"]: s for s in flow["jobs"]["pipeline"]["steps"] if "name" in s}
    compile_step = steps["compile the pipeline against the images, by digest"]
    assert compile_step["env"]["CPU_IMAGE"].endswith("@${{ needs.images.outputs.cpu }}")
    assert compile_step["env"]["GPU_IMAGE"].endswith("@${{ needs.images.outputs.gpu }}")
    assert '--image "$CPU_IMAGE" --gpu-image "$GPU_IMAGE"' in compile_step["run"]
    assert "gh release upload" in steps["release with the compiled pipeline"]["run"]


def test_the_release_compiles_with_the_committed_cluster_settings(tmp_path):
    """The release runs as the platform team set it in cluster.yaml, and that file is valid settings
    (a broken one would only show when a release is tagged)."""
    from kdpipe.orchestration.cluster import load_cluster_settings

    steps = {s["name"]: s for s in _workflow("release.yml")["jobs"]["pipeline"]["steps"] if "name" in s}
    assert "--cluster cluster.yaml" in steps["compile the pipeline against the images, by digest"]["run"]
    settings = load_cluster_settings(ROOT / "cluster.yaml")
    assert settings.tasks["distill"].timeout_seconds  # a full file, every task bounded


def test_the_release_images_are_accepted_by_submit_and_compile(tmp_path):
    """What the release step does, here: compile against two digests and check them like submit does."""
    import subprocess
    import sys

    from kdpipe.orchestration.cluster import check_image_for_cluster

    cpu = "registry.example.com/team/kdpipe@sha256:" + "1" * 64
    gpu = "registry.example.com/team/kdpipe@sha256:" + "2" * 64
    out = tmp_path / "release.yaml"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "kdpipe.cli",
            "pipeline",
            "compile",
            "--image",
            cpu,
            "--gpu-image",
            gpu,
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in __import__("os").environ.items() if not k.startswith("KDPIPE_")},
    )
    assert done.returncode == 0, done.stderr
    spec = next(yaml.safe_load_all(out.read_text()))
    images = {name: e["container"]["image"] for name, e in spec["deploymentSpec"]["executors"].items()}
    assert {n for n, i in images.items() if i == gpu} == {"exec-teacher", "exec-augment", "exec-distill"}
    assert all(check_image_for_cluster(i) for i in images.values())


def test_the_release_attaches_an_sbom_of_each_image(tmp_path):
    """Each image's Python packages as CycloneDX, every pinned package with its purl, attached to the
    release (issue 29: no SBOM was published)."""
    import json
    import subprocess
    import sys

    steps = {s["name"]: s for s in _workflow("release.yml")["jobs"]["pipeline"]["steps"] if "name" in s}
    sbom_step = next(s for name, s in steps.items() if name.startswith("SBOM"))
    assert "docker/sbom.py" in sbom_step["run"]
    assert "sbom-cpu.cdx.json sbom-gpu.cdx.json" in steps["release with the compiled pipeline"]["run"]
    for target in ("cpu", "gpu"):
        done = subprocess.run(
            [sys.executable, str(ROOT / "docker" / "sbom.py"), target, "v9.9.9"],
            capture_output=True,
            text=True,
            check=True,
        )
        bom = json.loads(done.stdout)
        assert bom["bomFormat"] == "CycloneDX" and bom["metadata"]["component"]["name"] == f"kdpipe-{target}"
        purls = {c["purl"] for c in bom["components"]}
        lock = (ROOT / "docker" / f"requirements-{target}.txt").read_text().splitlines()
        pinned = {
            f"pkg:pypi/{line.replace('==', '@')}"
            for line in lock
            if "==" in line and not line.startswith("#")
        }
        assert pinned <= purls and "pkg:pypi/kdpipe@v9.9.9" in purls


def test_ci_and_retrain_install_the_images_pinned_versions():
    """`make setup` (CI's .ci/run, the retrain and release workflows) installs with the CPU image's
    lock file as constraints, and re-installs when it changes: the same versions everywhere."""
    makefile = (ROOT / "Makefile").read_text()
    assert "IMAGE_LOCK := docker/requirements-cpu.txt" in makefile
    assert "$(STAMP): pyproject.toml $(IMAGE_LOCK)" in makefile
    assert "pip install -e '.[$(EXTRAS)]' --constraint $(IMAGE_LOCK)" in makefile
    for flow in ("retrain.yml", "release.yml"):
        runs = [s.get("run", "") for job in _workflow(flow)["jobs"].values() for s in job["steps"]]
        assert any("make setup" in run for run in runs), flow


# --- supply chain: actions pinned by commit, least-privilege tokens (issue 29) ---

WORKFLOWS = sorted(p.name for p in (ROOT / ".github" / "workflows").glob("*.yml"))
# `uses: owner/repo[/path]@<commit> # vX.Y.Z`: a tag can be moved to other code, a commit cannot;
# the comment says which release the commit is (and lets Dependabot/Renovate update it)
PINNED = re.compile(r"[\w.-]+/[\w.-]+(?:/[\w./-]+)?@[0-9a-f]{40} # v\d+\.\d+\.\d+")


def _uses_lines(name: str) -> list[str]:
    text = (ROOT / ".github" / "workflows" / name).read_text(encoding="utf-8")
    return [m[1].strip() for m in re.finditer(r"^\s*(?:-\s+)?uses:(.*)$", text, flags=re.M)]


def _jobs(name: str) -> dict:
    return _workflow(name)["jobs"]


def _pushes(steps: list[dict]) -> bool:
    return any(re.search(r"\bgit\s+push\b", step.get("run", "")) for step in steps)


def test_the_pin_checks_see_every_uses_line():
    for name in WORKFLOWS:
        parsed = [s["uses"] for job in _jobs(name).values() for s in job.get("steps", []) if "uses" in s]
        parsed += [job["uses"] for job in _jobs(name).values() if "uses" in job]  # reusable workflows
        assert len(_uses_lines(name)) == len(parsed) > 0, name


def test_every_action_is_pinned_to_a_commit_with_its_version_in_a_comment():
    commits: dict[str, set[str]] = {}
    for name in WORKFLOWS:
        for line in _uses_lines(name):
            if line.startswith("./"):  # an action of this repository: pinned by the checkout itself
                continue
            assert PINNED.fullmatch(line), f"{name}: `uses: {line}` is not pinned to a commit"
            action, rest = line.split("@", 1)
            commits.setdefault(action, set()).add(rest)
    # one action, one pin: two workflows on different commits of the same action is a half-done update
    assert all(len(pins) == 1 for pins in commits.values()), commits


def test_the_pin_pattern_rejects_tags_and_short_commits():
    assert PINNED.fullmatch("actions/checkout@" + "a" * 40 + " # v4.4.0")
    for line in (
        "actions/checkout@v4",
        "actions/checkout@v4.4.0",
        "actions/checkout@" + "a" * 40,  # no version comment
        "actions/checkout@" + "a" * 12 + " # v4.4.0",
        "actions/checkout@main # v4.4.0",
    ):
        assert not PINNED.fullmatch(line), line


def test_every_job_has_least_privilege_token_permissions():
    # what a write scope is for, and the step text that shows the job uses it
    needs = {
        "contents": (r"\bgit\s+push\b", r"\bgh\s+release\b"),
        "pull-requests": (r"\bgh\s+pr\b",),
        "id-token": (r"\bcosign\s+sign\b",),  # keyless signing: the OIDC token is the identity
    }
    for name in WORKFLOWS:
        flow = _workflow(name)
        top = flow.get("permissions")
        assert top is None or (isinstance(top, dict) and set(top.values()) <= {"read", "none"}), (
            f"{name}: the workflow-level token must be read-only"
        )
        for job_name, job in flow["jobs"].items():
            perms = job.get("permissions")
            assert perms is not None or top is not None, f"{name}/{job_name}: no permissions block"
            perms = top if perms is None else perms
            assert isinstance(perms, dict), f"{name}/{job_name}: permissions {perms!r} (write-all?)"
            runs = "\n".join(s.get("run", "") for s in job.get("steps", []))
            for scope, access in perms.items():
                assert access in ("read", "write", "none"), (name, job_name, scope, access)
                if access == "write":
                    patterns = needs.get(scope, ())
                    assert any(re.search(p, runs) for p in patterns), (
                        f"{name}/{job_name}: {scope}: write, but no step uses it"
                    )


def _pushes_with_its_own_token(step: dict) -> bool:
    """A step that pushes with the token in its own environment (gh as git's credential helper),
    not with one that checkout left in .git/config."""
    script = step.get("run", "")
    return (
        "GH_TOKEN" in step.get("env", {})
        and "gh auth setup-git" in script
        and script.index("gh auth setup-git") < script.index("git push")
    )


def test_checkout_keeps_no_token_unless_the_job_pushes_with_it():
    for name in WORKFLOWS:
        for job_name, job in _jobs(name).items():
            steps = job.get("steps", [])
            for i, step in enumerate(steps):
                if not str(step.get("uses", "")).startswith("actions/checkout@"):
                    continue
                persist = step.get("with", {}).get("persist-credentials", True)
                pushing = [s for s in steps[i + 1 :] if _pushes([s])]
                if pushing and not all(_pushes_with_its_own_token(s) for s in pushing):
                    assert persist is not False, f"{name}/{job_name}: pushes, but checkout dropped the token"
                else:
                    assert persist is False, f"{name}/{job_name}: checkout leaves the token in .git/config"


# --- release: the pushed images are scanned and signed, by digest (issue 29) ---

CPU_BY_DIGEST = "${{ vars.IMAGE_REPOSITORY }}@${{ needs.images.outputs.cpu }}"
GPU_BY_DIGEST = "${{ vars.IMAGE_REPOSITORY }}@${{ needs.images.outputs.gpu }}"
COSIGN_SIGN = r"\bcosign\s+sign\b"


def _needs(job: dict) -> set[str]:
    needs = job.get("needs", [])
    return {needs} if isinstance(needs, str) else set(needs)


def _uses(step: dict, action: str) -> bool:
    return str(step.get("uses", "")).startswith(action + "@")


def _logged_in_to_the_image_registry(steps: list[dict]) -> bool:
    """A registry login with the REGISTRY_* secrets, as the images job pushes with."""
    return any(
        _uses(s, "docker/login-action")
        and s["with"]["registry"] == "${{ vars.IMAGE_REPOSITORY }}"
        and _secrets(s["with"]) == {"REGISTRY_USERNAME", "REGISTRY_PASSWORD"}
        for s in steps
    )


def test_the_release_scans_both_pushed_images_by_digest_and_stops_on_fixable_critical():
    jobs = _jobs("release.yml")
    reports: dict[str, tuple[str, str]] = {}  # image -> (job, report file)
    for job_name, job in jobs.items():
        steps = job.get("steps", [])
        for i, step in enumerate(steps):
            if not _uses(step, "aquasecurity/trivy-action"):
                continue
            scan = step["with"]
            assert scan["severity"] == "CRITICAL" and scan["ignore-unfixed"] is True
            assert str(scan["exit-code"]) == "1"  # a finding fails the step, the job, the release
            # the action reports every severity in SARIF (and so fails on any of them): JSON keeps the filter
            assert scan["format"] == "json"
            assert _logged_in_to_the_image_registry(steps[:i]), (
                f"{job_name}: scans a private image logged out"
            )
            reports[scan["image-ref"]] = (job_name, scan["output"])
    assert set(reports) == {CPU_BY_DIGEST, GPU_BY_DIGEST}  # both images, by the digest that was pushed
    (scan_job,) = {job for job, _ in reports.values()}
    files = {file for _, file in reports.values()}
    assert len(files) == 2
    # the second scan runs (and reports) when the first failed
    scans = [s for s in jobs[scan_job]["steps"] if _uses(s, "aquasecurity/trivy-action")]
    assert all("!cancelled()" in s["if"] for s in scans[1:])
    # no release without a passed scan
    assert scan_job in _needs(jobs["pipeline"])
    # the reports are kept as an artifact even when a scan fails, and attached to the release
    (upload,) = [s for s in jobs[scan_job]["steps"] if _uses(s, "actions/upload-artifact")]
    assert "!cancelled()" in upload["if"] and files <= set(upload["with"]["path"].split())
    release_steps = jobs["pipeline"]["steps"]
    (download,) = [s for s in release_steps if _uses(s, "actions/download-artifact")]
    assert download["with"]["name"] == upload["with"]["name"]
    release = next(s["run"] for s in release_steps if "gh release upload" in s.get("run", ""))
    assert all(file in release.split() for file in files)


def _signed_images(step: dict) -> list[str]:
    """The image references a step's `cosign sign` lines sign, read through the step's environment."""
    images = []
    for line in step.get("run", "").splitlines():
        if not re.search(COSIGN_SIGN, line):
            continue
        args = line.split()
        assert "--yes" in args, line  # no prompt on a runner
        assert not any(a.startswith(("--key", "--sk")) for a in args), line  # keyless: no key to keep
        ref = args[-1].strip("\"'")
        variable = re.fullmatch(r"\$\{?(\w+)\}?", ref)
        images.append(step["env"][variable[1]] if variable else ref)
    return images


def test_the_release_signs_both_pushed_images_by_digest_keylessly():
    jobs = _jobs("release.yml")
    signed: dict[str, str] = {}  # image -> job
    for job_name, job in jobs.items():
        steps = job.get("steps", [])
        for i, step in enumerate(steps):
            for image in _signed_images(step):
                assert any(_uses(s, "sigstore/cosign-installer") for s in steps[:i]), job_name
                # cosign pushes the signature with the registry login, not the job's token
                assert _logged_in_to_the_image_registry(steps[:i]), job_name
                signed[image] = job_name
    assert set(signed) == {CPU_BY_DIGEST, GPU_BY_DIGEST}  # a tag could be moved; a digest names the image
    (sign_job,) = set(signed.values())
    scan_job = next(
        name for name, job in jobs.items() if any(_uses(s, "aquasecurity/trivy-action") for s in job["steps"])
    )
    assert scan_job in _needs(jobs[sign_job])  # only an image that passed the scan is signed
    assert sign_job in _needs(jobs["pipeline"])  # and the release lists signed images only


def test_only_the_signing_job_gets_an_id_token():
    granted = {
        (name, job_name)
        for name in WORKFLOWS
        for job_name, job in _jobs(name).items()
        if (job.get("permissions") or {}).get("id-token") == "write"
    }
    signing = {
        (name, job_name)
        for name in WORKFLOWS
        for job_name, job in _jobs(name).items()
        if any(re.search(COSIGN_SIGN, s.get("run", "")) for s in job.get("steps", []))
    }
    assert len(signing) == 1 and granted == signing
    ((name, job_name),) = signing
    # the signatures are pushed with the REGISTRY_* login: the job's token writes no packages
    assert _jobs(name)[job_name]["permissions"] == {"contents": "read", "id-token": "write"}
