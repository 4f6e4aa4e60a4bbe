"""Sidecar injection: decide, render, patch. Pure functions; `webhook.app` is the HTTPS edge."""
