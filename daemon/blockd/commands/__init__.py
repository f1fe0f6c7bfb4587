"""The command table: every QMP command the daemon implements beyond the
protocol's own (``qmp_capabilities``, ``query-commands``), by name.

Each name must also have a schema under ``schema/commands/``; the dispatcher
refuses to start if the two sets differ.
"""

from __future__ import annotations

from collections.abc import Mapping

from blockd.commands import block, create, export, jobs, misc, plan, snapshot, transaction
from blockd.commands.context import CommandContext, Handler

HANDLERS: Mapping[str, Handler] = {
    "query-version": misc.query_version,
    "quit": misc.quit_daemon,
    "blockdev-add": block.blockdev_add,
    "blockdev-del": block.blockdev_del,
    "query-named-block-nodes": block.query_named_block_nodes,
    "query-block": block.query_block,
    "block-commit": jobs.block_commit,
    "blockdev-create": create.blockdev_create,
    "query-jobs": jobs.query_jobs,
    "query-block-jobs": jobs.query_block_jobs,
    "block-job-set-speed": jobs.block_job_set_speed,
    "block-job-cancel": jobs.block_job_cancel,
    "block-job-pause": jobs.block_job_pause,
    "block-job-resume": jobs.block_job_resume,
    "block-job-complete": jobs.block_job_complete,
    "block-job-finalize": jobs.block_job_finalize,
    "block-job-dismiss": jobs.block_job_dismiss,
    "job-pause": jobs.job_pause,
    "job-resume": jobs.job_resume,
    "job-cancel": jobs.job_cancel,
    "job-complete": jobs.job_complete,
    "job-finalize": jobs.job_finalize,
    "job-dismiss": jobs.job_dismiss,
    "nbd-server-start": export.nbd_server_start,
    "nbd-server-stop": export.nbd_server_stop,
    "nbd-server-add": export.nbd_server_add,
    "nbd-server-remove": export.nbd_server_remove,
    "block-export-add": export.block_export_add,
    "block-export-del": export.block_export_del,
    "query-block-exports": export.query_block_exports,
    "blockdev-snapshot": snapshot.blockdev_snapshot,
    "blockdev-snapshot-sync": snapshot.blockdev_snapshot_sync,
    "transaction": transaction.transaction,
    # downstream extensions (QAPI's __RFQDN_ prefix)
    "__org.blockd_commit-plan": plan.commit_plan,
}

__all__ = ["HANDLERS", "CommandContext", "Handler"]
