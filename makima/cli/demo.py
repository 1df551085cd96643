"""`makima demo`: the whole product in one command, with no LLM and nothing to
install. It uses the Temporal server at TEMPORAL_ADDRESS when one answers (and
starts a worker for it when none polls), else starts the embedded stack
(makima.devstack); makes a sample git repository; runs `examples/demo.yaml` with
the live table; approves the step that lands yellow through the `approve_step`
update, saying so; prints the summary, the integration branch and the UI link;
and stops whatever it started.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
from pathlib import Path

from temporalio.client import Client

from makima.cli import EXIT_OK, EXIT_REFUSED, views
from makima.cli.commands import follow_directive, send_update, start_directive
from makima.cli.spec import load_spec
from makima.connection import task_queue
from makima.devstack import (
    DevStack,
    DevStackError,
    free_port,
    has_workflow_pollers,
    try_connect,
    ui_url_for,
)
from makima.models import ApprovalDecision, DirectiveSnapshot, DirectiveSpec, DirectiveStatus

DEMO_SPEC = Path(__file__).resolve().parents[2] / "examples" / "demo.yaml"
GIT_IDENTITY = {"GIT_AUTHOR_NAME": "makima demo", "GIT_AUTHOR_EMAIL": "demo@makima.invalid",
                "GIT_COMMITTER_NAME": "makima demo", "GIT_COMMITTER_EMAIL": "demo@makima.invalid"}


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True,
                          env={**os.environ, **GIT_IDENTITY}).stdout


def make_sample_repository(folder: Path) -> Path:
    """A small git repository on `main` with no test suite (so the only checks are
    the steps' own `verify` commands)."""
    repo = folder / "sample-repo"
    repo.mkdir(parents=True)
    _git(repo, "init", "-q", "-b", "main")
    (repo / "README.md").write_text("# sample\n\nA repository for the makima demo.\n")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "initial commit")
    return repo


class YellowApprover:
    """Approves each step that waits for a person, once, through the update."""

    def __init__(self, client: Client, directive_id: str) -> None:
        self.client = client
        self.directive_id = directive_id
        self.approved: list[str] = []

    async def __call__(self, snapshot: DirectiveSnapshot) -> None:
        for pending in snapshot.pending_approvals:
            if pending.step in self.approved:
                continue
            print(f"demo: step {pending.step!r} landed yellow (score {pending.score:.2f}: no "
                  "check verified it), so it waits for a person; the demo approves it now "
                  "through the approve_step update, like "
                  f"`makima approve {self.directive_id} {pending.step}`", flush=True)
            answer = await send_update(self.client, self.directive_id, "approve_step",
                                       ApprovalDecision(step=pending.step, by="demo",
                                                        comment="approved by makima demo"))
            print(f"demo: approve_step answered: {answer.message}", flush=True)
            self.approved.append(pending.step)


async def _stack(port: int | None, ui_port: int | None) -> DevStack:
    """The demo's own stack on free ports, unless TEMPORAL_ADDRESS names a server
    (then that one, so the demo never lands on whatever answers on :7233)."""
    address = os.environ.get("TEMPORAL_ADDRESS", "").strip()
    if not address:
        port, ui_port = port or free_port(), ui_port or free_port()
        print(f"demo: starting its own embedded stack (Temporal dev server on :{port}, its UI "
              f"on :{ui_port}, Postgres, a worker); set TEMPORAL_ADDRESS to use a running "
              "server", flush=True)
        return DevStack(port=port, ui_port=ui_port)
    client = await try_connect(address)
    if client is None:
        raise DevStackError(f"TEMPORAL_ADDRESS={address} does not answer; start it (`makima "
                            "dev`), or unset TEMPORAL_ADDRESS for the demo's own stack")
    workers = await has_workflow_pollers(client, task_queue())
    print(f"demo: using the Temporal server at {address}"
          + ("" if workers else "; starting a worker for it"), flush=True)
    return DevStack(start_temporal=False, start_worker=not workers, address=address)


def _prepare(workdir: Path | None) -> tuple[Path, DirectiveSpec]:
    folder = Path(workdir or tempfile.mkdtemp(prefix="makima-demo-")).resolve()
    repo = make_sample_repository(folder)
    return repo, load_spec(DEMO_SPEC, repo=str(repo))


async def run_demo(*, workdir: Path | None = None, port: int | None = None,
                   ui_port: int | None = None) -> int:
    repo, spec = await asyncio.to_thread(_prepare, workdir)
    print(f"demo: sample repository {repo}", flush=True)
    async with await _stack(port, ui_port) as stack:
        assert stack.client is not None
        if stack.start_temporal:
            print(stack.ready_line(), flush=True)
        ui = (stack.ui_url if stack.start_temporal
              else os.environ.get("MAKIMA_UI_URL") or ui_url_for(stack.address))
        handle = await start_directive(stack.client, spec)
        link = f"{ui}/namespaces/{stack.client.namespace}/workflows/{handle.id}"
        print(f"demo: started {handle.id}\ndemo: watch it in the Temporal UI: {link}", flush=True)
        approver = YellowApprover(stack.client, handle.id)
        final = await follow_directive(stack.client, handle.id, on_snapshot=approver)
        views.out(views.status_view(final, plain=not views.is_terminal()))
        print()
        if final.status is not DirectiveStatus.COMPLETED:
            print(f"demo: the directive ended {final.status.value}: {final.reason}")
            return EXIT_REFUSED
        reworked = [s.name for s in final.steps if s.attempts > 1]
        print(f"demo: completed: {len(final.steps)} steps passed; reworked: "
              f"{', '.join(reworked) or 'none'}; approved by the demo: "
              f"{', '.join(approver.approved) or 'none'}")
        branch = final.integration_branch
        print(f"demo: integration branch {branch} in {repo}:")
        print((await asyncio.to_thread(_git, repo, "log", "--oneline", branch)).rstrip())
        print(f"demo: see it with `git -C {repo} log --stat {branch}`")
        print(f"demo: Temporal UI: {link}")
        if stack.start_temporal:
            print("demo: the embedded stack stops now; `makima dev` keeps one running")
    return EXIT_OK
