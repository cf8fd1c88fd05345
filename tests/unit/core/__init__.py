"""Top-level modules: config, cli, storage, errors."""
