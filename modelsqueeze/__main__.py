"""`python -m modelsqueeze` runs the command-line app."""

from modelsqueeze.cli import main

main()
