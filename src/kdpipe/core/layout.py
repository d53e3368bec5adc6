"""Default locations of each step's output, relative to the project root.

DVC stages, the CLI defaults and the tests all use these, so a step's output folder is named in
one place only.
"""

ARTIFACTS = "artifacts"
PREPARED = f"{ARTIFACTS}/prepared"
AUGMENTED = f"{ARTIFACTS}/augmented"
TEACHER = f"{ARTIFACTS}/teacher"
DISTILL = f"{ARTIFACTS}/distill"
SELECTED = f"{ARTIFACTS}/selected"
EXPORTED = f"{ARTIFACTS}/export"
EVALUATION = f"{ARTIFACTS}/evaluate"
REGISTERED = f"{ARTIFACTS}/register"
