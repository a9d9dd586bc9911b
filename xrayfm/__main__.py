"""``python -m xrayfm`` runs the command line."""

from xrayfm.cli import main

main()
