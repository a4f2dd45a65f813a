"""`python -m service.model [overrides]`: the per-layer table.

The command lives here for its name; the Hydra-aware code it runs lives
outside the model package (`service.model_table`), which stays plain torch."""

from service.model_table import main

main()
