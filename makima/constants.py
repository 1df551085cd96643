"""Task queue names, activity timeouts and retry policies: one place, so calls
never carry literals. Pure (temporalio.common only): imported by workflows.

Timeouts, and why:
- planning and evaluation are LLM calls (plus, for evaluation, the repository's
  test suite): minutes, retried with backoff on rate limits and overload;
- an agent's attempt can take long, so `execute_step` gets a generous
  start-to-close and a short heartbeat timeout: a dead worker is noticed within
  AGENT_HEARTBEAT_TIMEOUT and the attempt is retried elsewhere;
- record writes retry without a cap on attempts (Postgres may be down for a
  while) but with a bounded interval, so nothing in the audit trail is lost.
"""

from datetime import timedelta

from temporalio.common import RetryPolicy

TASK_QUEUE = "makima"

PLAN_TIMEOUT = timedelta(minutes=10)
#: The planner heartbeats while its call is out, so that a cancel reaches it.
PLAN_HEARTBEAT_TIMEOUT = timedelta(seconds=60)
PLAN_RETRY_POLICY = RetryPolicy(
    initial_interval=timedelta(seconds=2),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=1),
    maximum_attempts=5,
)

EXECUTE_TIMEOUT = timedelta(hours=2)
AGENT_HEARTBEAT_TIMEOUT = timedelta(seconds=60)
EXECUTE_RETRY_POLICY = RetryPolicy(
    initial_interval=timedelta(seconds=5),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=2),
    maximum_attempts=3,
)

EVALUATE_TIMEOUT = timedelta(minutes=30)
EVALUATE_HEARTBEAT_TIMEOUT = timedelta(seconds=60)
EVALUATE_RETRY_POLICY = PLAN_RETRY_POLICY

#: How long an activity routed to the worker that holds an attempt's worktree
#: (evaluate-and-merge, merge, cleanup) may wait for it: longer means that worker is gone, and the
#: attempt's commit is checked out on another worker instead.
WORKTREE_SCHEDULE_TO_START = timedelta(seconds=60)

GIT_TIMEOUT = timedelta(minutes=10)
#: Git activities heartbeat while they run: a worker that dies mid-merge is
#: noticed within this, not after the whole GIT_TIMEOUT.
GIT_HEARTBEAT_TIMEOUT = timedelta(seconds=30)
GIT_RETRY_POLICY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=5,
)

#: An evaluation that merges the attempt when it passes (activities/evaluate_merge.py).
EVALUATE_AND_MERGE_TIMEOUT = EVALUATE_TIMEOUT + GIT_TIMEOUT

#: Asking the server what a pending activity's tries were billed (a stop's first step).
BILLED_SO_FAR_TIMEOUT = timedelta(seconds=10)
BILLED_SO_FAR_RETRY_POLICY = RetryPolicy(maximum_attempts=2)

RECORD_TIMEOUT = timedelta(seconds=30)
RECORD_RETRY_POLICY = RetryPolicy(
    initial_interval=timedelta(milliseconds=500),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=10),
    maximum_attempts=0,  # unlimited: an outage of the database must not lose events
)

#: Notifications (NotifyWorkflow): each POST may take NOTIFY_TIMEOUT; a receiver
#: that is down is retried with backoff for up to NOTIFY_WITHIN, then given up.
NOTIFY_TIMEOUT = timedelta(seconds=30)
NOTIFY_WITHIN = timedelta(hours=24)
NOTIFY_RETRY_POLICY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=5),
    maximum_attempts=0,  # bounded by NOTIFY_WITHIN
    non_retryable_error_types=["NotifyReceiverGone"],
)

#: A directive run continues as new, within its generation, once its history has
#: this many events, as the run counts them (workflows/history_gauge.py, which
#: over-counts a little), and no step workflow runs (Temporal's own limit is 51,200;
#: replay time grows with history length).
HISTORY_CHECKPOINT_EVENTS = 5000
#: ... or once what it added to its history holds this many payload bytes (Temporal
#: warns at 10 MB of history and ends the workflow at 50 MB).
HISTORY_CHECKPOINT_BYTES = 4 * 1024 * 1024
#: How many recent events the `status` query carries.
RECENT_EVENTS = 20
#: Longest text (output tails, summaries) a workflow keeps in its state or events.
MAX_TEXT_IN_HISTORY = 4000

#: Activity slots per worker. Most activities are short (event records, merges)
#: and wait on I/O; with the SDK's default of 100, 50 directives at once left new
#: activities queued on the server (schedule-to-start p95 5.9 s; with 400: 0.002 s,
#: see README "Performance"). Agent runs are bounded on their own by
#: `worker.py --max-concurrent-steps`.
WORKER_ACTIVITY_SLOTS = 400
#: Workers send heartbeats at most this often. Cancellation reaches an activity
#: only with a heartbeat's answer, so this bounds how long `stop` takes to kill
#: an agent (the SDK's default, 0.8 x the heartbeat timeout, would be 48 s).
HEARTBEAT_THROTTLE = timedelta(seconds=1)
