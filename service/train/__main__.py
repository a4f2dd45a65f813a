"""`python -m service.train [hydra overrides]`: see `service.launch`."""

from service.launch import main

main()
