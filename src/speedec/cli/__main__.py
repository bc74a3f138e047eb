"""``python -m speedec.cli``: the ``speedec`` command."""

from . import main

main()
