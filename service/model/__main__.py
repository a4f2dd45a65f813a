"""`python -m service.model [hydra overrides]`: the per-layer table."""

from service.cli import model_table_main

model_table_main()
