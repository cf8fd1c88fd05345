"""Tests that start Ray, S3 (moto_server), multi-node clusters, CLI subprocesses, job submission or a browser; all marked ``ray``."""
