# The control plane image: `make image` builds it as controlplane:dev, the name k8s/controlplane/deployment.yaml
# uses; the README's Kubernetes quickstart (and tests/e2e, with the same steps) loads it into kind.
FROM python:3.11-slim
WORKDIR /app
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY pyproject.toml README.md ./
COPY controlplane ./controlplane
RUN pip install --no-cache-dir . && useradd --uid 65532 --no-create-home controlplane
USER 65532
ENTRYPOINT ["controlplane"]
