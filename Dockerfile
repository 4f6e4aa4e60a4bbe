# The control plane image: `meshctl serve` (xDS, CA, injection webhook, admin), and also the image of
# the injected init container (`meshctl iptables` needs iptables; it runs as root with NET_ADMIN and
# NET_RAW, as the webhook renders it). The sidecar itself stays the stock Envoy image.
# Build context: the repository root (see .dockerignore).
#   docker build -t meshplane:0.1.0 .
# tests/e2e/test_images.py builds an equivalent image without a registry, following the steps below.
FROM python:3.11-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/*

# The project only (no dev extras); protos are compiled by setup.py during the install.
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY controlplane controlplane
COPY webhook webhook
COPY bootstrap bootstrap
COPY protos protos
COPY sandbox sandbox
RUN pip install --no-cache-dir --disable-pip-version-check /src \
 && rm -rf /src

# `meshctl serve` runs as an unprivileged user; its state (CA, registrations) and sockets live in
# directories it owns, so named volumes mounted there start out writable by it.
RUN groupadd --system --gid 10001 meshplane \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/meshplane --shell /usr/sbin/nologin meshplane \
 && mkdir -p /var/lib/meshplane /run/meshplane \
 && chown 10001:10001 /var/lib/meshplane /run/meshplane
WORKDIR /var/lib/meshplane
ENV HOME=/var/lib/meshplane
USER 10001:10001
EXPOSE 15012 15014 15017
ENTRYPOINT ["meshctl"]
CMD ["--help"]
