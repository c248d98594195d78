"""`python -m compressor` is the `compress` command."""

from .cli import main

main()
