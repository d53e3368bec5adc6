"""Pipeline steps: one module per step, each the only implementation of that step."""
