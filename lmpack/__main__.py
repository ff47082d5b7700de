"""`python -m lmpack` runs the CLI."""

from lmpack.cli.main import main

main()
