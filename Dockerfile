# The control plane image (tests/e2e builds it and loads it into kind as controlplane:dev).
FROM python:3.11-slim
WORKDIR /app
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY pyproject.toml README.md ./
COPY controlplane ./controlplane
RUN pip install --no-cache-dir . && useradd --uid 65532 --no-create-home controlplane
USER 65532
ENTRYPOINT ["controlplane"]
