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
# the `claude` extra: the default executor (Claude Code through its Agent SDK)
RUN pip install --no-cache-dir '.[claude]'
# Not root: Claude Code refuses bypassPermissions for root, and an agent has no
# business with root's powers. Each container keeps its own MAKIMA_HOME (an
# anonymous volume per replica: worktrees, clones, agent records); what workers
# share is the remote of a `url` repository.
RUN useradd --create-home --uid 1000 makima \
    && mkdir -p /var/lib/makima && chown makima:makima /var/lib/makima
USER makima
ENV MAKIMA_HOME=/var/lib/makima
VOLUME /var/lib/makima
STOPSIGNAL SIGTERM
CMD ["python", "worker.py"]
