"""Stage 6, deploy: saved models, the models loaded for batch scoring and the online service, the incremental scoring index, the HTTP API's rules, export and the web page."""
