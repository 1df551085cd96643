# The makima worker image: `docker compose up --scale worker=N` runs N of these.
FROM python:3.11-slim
# bubblewrap: every agent command, Claude Code and every check runs in its sandbox
# (makima/sandbox.py); the worker refuses to start without it.
RUN apt-get update && apt-get install -y --no-install-recommends git bubblewrap \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md worker.py starter.py ./
COPY makima ./makima
COPY workflows ./workflows
COPY activities ./activities
RUN pip install --no-cache-dir .
ENV MAKIMA_HOME=/var/lib/makima
VOLUME /var/lib/makima
STOPSIGNAL SIGTERM
CMD ["python", "worker.py"]
