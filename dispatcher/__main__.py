"""``python -m dispatcher``: the same command line as the ``dispatcher`` script."""

from dispatcher.cli import main

main()
