"""`mvtec-ray fit` as a Ray job: `ray job submit --working-dir . -- python pipelines/fit.py ...` (or run it directly)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project root, for job submission
from mvtec_ray.cli import job_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(job_main("fit"))
