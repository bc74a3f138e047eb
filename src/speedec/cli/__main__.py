"""``python -m speedec.cli``: the ``speedec`` command, also where a module must be named, as
under ``torchrun``: ``torchrun --nproc_per_node=2 -m speedec.cli train --config FILE``."""

from . import main

main()
