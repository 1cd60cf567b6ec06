"""``python -m fisherfast …`` runs the ``fisherfast`` command (also under
``torchrun --nproc-per-node N -m fisherfast …``)."""
import sys

from fisherfast.cli import main

if __name__ == "__main__":
    sys.exit(main())
