"""``python -m mvtec_ray`` = the ``mvtec-ray`` command."""
import sys

from .cli import main

sys.exit(main())
