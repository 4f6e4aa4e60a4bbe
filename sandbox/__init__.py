"""The local sandbox: pods on a container engine (podman or Docker), the demo and its echo app.

Not part of the control plane: `meshctl demo` and the end-to-end tests use it to run sidecar'd
pods on one machine. Public entry points: `sandbox.demo.run`, `sandbox.pods.PodRunner`.
"""
