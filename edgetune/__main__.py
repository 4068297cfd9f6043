"""`python -m edgetune` == the `edgetune` command."""
import sys

from .cli import main

sys.exit(main())
