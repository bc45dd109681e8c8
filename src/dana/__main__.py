"""``python -m dana`` is the ``dana`` command."""

from dana.cli import main

main()
