"""MLflow tracking: the one adapter module, redaction of secrets, figures."""
