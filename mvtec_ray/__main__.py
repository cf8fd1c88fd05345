"""``python -m mvtec_ray`` = the ``mvtec-ray`` command."""
import sys

from mvtec_ray.cli import main

sys.exit(main())
