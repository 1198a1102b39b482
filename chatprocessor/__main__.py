"""`python -m chatprocessor` runs the CLI."""

from chatprocessor.cli import main

main()
