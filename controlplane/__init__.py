"""Meshplane's control plane: mesh model, xDS generation and serving, the mesh CA, and `meshctl`.

Public entry points: `controlplane.app.ControlPlane` (and `serve`), `controlplane.cli.main`,
and the pure modules `model`, `meshfile`, `generate`, `cache` and `stream`. Everything else may change.
"""
