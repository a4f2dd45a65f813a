"""The per-worker training step and loop. torch only: runs under any process
group (or none), so tests and benchmarks need no Ray. `python -m service.train`
is the service's entry point (see `service.launch`)."""
