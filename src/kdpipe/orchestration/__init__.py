"""What runs around the steps: MLflow tracking and the registry, the Kubeflow task runtime, cluster
settings, TrainJob, object storage, the retrain loop and reports. Never imports a step.
"""
