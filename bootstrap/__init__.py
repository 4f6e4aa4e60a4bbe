"""What a sidecar needs before its first xDS response.

- `bootstrap.envoy`: workload identity + xDS address -> Envoy bootstrap.
- `bootstrap.iptables`: capture flags -> iptables rules, applied atomically (stdlib only,
  so the proxy image's init step needs no third-party packages).
"""
