# The control plane for Docker users (docker-compose.yml). Build context: the repository root.
FROM python:3.11-slim
WORKDIR /src
COPY . .
RUN pip install --no-cache-dir . && rm -rf /src
ENTRYPOINT ["meshctl"]
