"""Distributed two-tower AlexNet training: Ray Train + Ray Data + MLflow + Hydra."""
