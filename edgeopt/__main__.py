"""`python -m edgeopt`: the CLI."""

from edgeopt.cli import main

main()
