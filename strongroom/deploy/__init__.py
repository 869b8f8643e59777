"""Putting strongroom on a Prefect API: bootstrap, Kubernetes, a local server, make up."""
