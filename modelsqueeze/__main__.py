"""`python -m modelsqueeze` runs the command-line app."""

from modelsqueeze.entry import main

main()
