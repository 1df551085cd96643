"""NotifyWorkflow: deliver one notification to one receiver, with Temporal's
retries while the receiver is down. Started by the record activity, once per
(event, receiver) by its workflow id (makima/notify.py says why that is exactly
once). The input names the receiver by a hash: webhook URLs are secrets and
stay in the workers' environment, never in history.
"""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from makima.constants import NOTIFY_RETRY_POLICY, NOTIFY_TIMEOUT, NOTIFY_WITHIN
    from makima.contracts import ActivityName, NotifyInput, NotifyOutput


@workflow.defn(name="NotifyWorkflow")
class NotifyWorkflow:
    @workflow.run
    async def run(self, notification: NotifyInput) -> NotifyOutput:
        return await workflow.execute_activity(
            ActivityName.DELIVER_NOTIFICATION.value, notification,
            result_type=NotifyOutput, start_to_close_timeout=NOTIFY_TIMEOUT,
            schedule_to_close_timeout=NOTIFY_WITHIN, retry_policy=NOTIFY_RETRY_POLICY,
            summary=f"{notification.payload.get('kind')} {notification.payload.get('id')}")
