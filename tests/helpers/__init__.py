"""Helpers shared by tests: data builders, fakes, multi-node scenario scripts. No tests here."""
