"""Ray-free tests, one folder per stage of mvtec_ray (the fast loop: pytest -m "not ray")."""
