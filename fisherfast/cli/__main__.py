"""`python -m fisherfast.cli` runs the `fisherfast` command."""
import sys

from fisherfast.cli import main

sys.exit(main())
