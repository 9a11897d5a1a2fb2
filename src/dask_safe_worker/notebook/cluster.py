"""`dask_safe_worker.LocalCluster`: distributed's LocalCluster on the safe budget, live.

The only module of the package that imports distributed at module level; the package
loads it on first use of the name. At construction, before distributed starts anything:
plan (with a claim in the pool), the workers' child cgroup where the kernel permits it,
the live-limit channel, the plan file; then distributed's own LocalCluster with the
plan's `memory_limit` (unless one was given), our preloads and the variables
`dask-safe-audit` reads; then the follow thread. At close, all of it is undone.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import distributed

from ..cgroup.pool import Pool, find_pool
from ..cgroup.write import WriteOptions, WriteOutcome
from ..dask_compat.local_cluster import local_cluster_counts
from ..dask_compat.release import Version
from ..events import make_audit
from ..follow.live_limit import LIVE_FILE_ENV, LiveLimit, write_ack
from ..follow.watch import report_started
from ..options import PLAN_EXPORT_ENV
from ..records import replace
from .budget import plan_and_claim, supported_release
from .child import WorkerCgroup, make_worker_cgroup
from .join import CGROUP_ENV, KERNEL_PID_ENV
from .plan import NOTEBOOK_RESERVE, ReserveValue, notebook_args, notebook_settings
from .watch import FollowThread, NotebookWatch

JOIN_PRELOAD = "dask_safe_worker.notebook.join"
FOLLOW_PRELOAD = "dask_safe_worker.follow.worker"

# One safe cluster per process holds a claim in the pool (a claim is named by its pid).
_claimed_by: list[int] = []


# The oldest distributed the cluster is tested with (the compatibility matrix).
LOCAL_CLUSTER_OLDEST = Version(2025, 12, 0)


class LocalCluster(distributed.LocalCluster):
    """`distributed.LocalCluster` with `dask-safe-worker`'s budget (docs/notebooks.md).

    Every argument of distributed's LocalCluster is taken as it is; a `memory_limit`
    given passes through unchanged, as with the CLI. Ours are keyword-only:
    `reserve` (what stays free for this process's own growth: bytes or a fraction, 25 %
    by default), `follow` (move the budget live, default True), `follow_interval`
    (seconds), `cgroup_write` ("auto", "never" or "required"), `log_format` (the audit
    log on stderr: "auto", "json", "console" or "none")."""

    def __init__(
        self,
        name: str | None = None,
        n_workers: int | None = None,
        threads_per_worker: int | None = None,
        processes: bool | None = None,
        *args: Any,
        reserve: ReserveValue = NOTEBOOK_RESERVE,
        follow: bool = True,
        follow_interval: float = 1.0,
        cgroup_write: str = "auto",
        log_format: str = "auto",
        **kwargs: Any,
    ) -> None:
        self._dsw_undo: list[Any] = []
        if processes is None:
            worker_class = kwargs.get("worker_class")
            processes = worker_class is None or issubclass(worker_class, distributed.Nanny)
        audit = make_audit(log_format)
        self._dsw_audit = audit
        write_options = WriteOptions(mode=cgroup_write)  # type: ignore[arg-type]
        release = supported_release()
        if release.distributed is not None and release.distributed < LOCAL_CLUSTER_OLDEST:
            # Older releases fail our tests (a worker's close in SpecCluster._close, the
            # threads' limits): refused with the way that works, never half started.
            raise RuntimeError(
                f"dask_safe_worker.LocalCluster needs distributed>={LOCAL_CLUSTER_OLDEST} "
                f"(this is {release.distributed}); with it, pass "
                "memory_limit=dask_safe_worker.memory_limit(...) to distributed.LocalCluster"
            )
        try:
            self._dsw_prepare(
                release, n_workers, threads_per_worker, processes, reserve, follow,
                follow_interval, write_options, kwargs,
            )  # fmt: skip
            super().__init__(  # type: ignore[no-untyped-call]
                name, n_workers, threads_per_worker, processes, *args, **kwargs
            )
        except BaseException:
            self._dsw_cleanup()
            raise
        if self._dsw_thread is not None:
            self._dsw_thread.start()

    # -- before distributed starts anything ----------------------------------------------

    def _dsw_prepare(
        self,
        release: Any,
        n_workers: int | None,
        threads_per_worker: int | None,
        processes: bool,
        reserve: ReserveValue,
        follow: bool,
        interval: float,
        write_options: WriteOptions,
        kwargs: dict[str, Any],
    ) -> None:
        from ..measure import measure

        audit = self._dsw_audit
        self._dsw_processes = processes
        self._dsw_thread: FollowThread | None = None
        self._dsw_child: WorkerCgroup | None = None
        self._dsw_env: dict[str, str | None] = {}
        self._dsw_held: dict[str, int] = {}
        self._dsw_slots: dict[str, int] = {}
        cpu_count = measure(release=release).cpu_count
        args = notebook_args(n_workers, threads_per_worker, processes, cpu_count)
        given = kwargs.get("memory_limit")
        if given is not None:
            args = replace(args, memory_limit=str(given))
        settings = notebook_settings(reserve, follows=follow)
        pool = None
        if not _claimed_by:
            # A second safe cluster in this process plans around the first's claim.
            pool = find_pool(measure(release=release), os.environ, create=True)
        m, plan, claim = plan_and_claim(release, args, settings, pool)
        if claim is not None:
            _claimed_by.append(os.getpid())
            self._dsw_undo.append(lambda: _claimed_by.remove(os.getpid()))
            self._dsw_undo.append(lambda: os.close(claim))
            assert pool is not None
            self._dsw_undo.append(lambda: pool.leave(os.getpid()))
        else:
            pool = None
        audit(
            "notebook.started",
            processes=processes,
            n_workers=plan.n_workers,
            threads_per_worker=plan.nthreads,
            reserve=settings.reserve.describe(),
            follow=follow,
        )
        audit("measure.done", **m.as_dict())
        audit("plan.made", **plan.as_dict())
        outcome = self._dsw_kernel_limit(m, plan.budget, processes, write_options)
        member = None
        if pool is not None:
            member = _member_now(pool, plan, outcome, self._dsw_child)
        spec = None
        env: dict[str, str] = {}
        if follow:
            from ..follow.setup import FollowUnavailable, prepare

            try:
                setup = prepare(
                    m, plan, args, settings, outcome, interval, pool=pool, member=member
                )
            except FollowUnavailable as exc:
                audit("follow.disabled", reason=str(exc))
            else:
                spec = setup
                env.update(setup.env)
                self._dsw_undo.append(lambda: _remove_spec_dir(setup.spec_file))
        self._dsw_plan_file(m, plan, outcome, write_options, spec is not None, pool, member, env)
        if self._dsw_child is not None:
            env[CGROUP_ENV] = self._dsw_child.directory
        env[KERNEL_PID_ENV] = str(os.getpid())
        if given is None and plan.memory_limit_arg is not None:
            kwargs["memory_limit"] = plan.memory_limit_arg
        self._dsw_worker_options(processes, env, spec is not None, kwargs)
        if spec is not None:
            self._dsw_watch(spec.spec_file, release)

    def _dsw_kernel_limit(
        self, m: Any, budget: int, processes: bool, opts: WriteOptions
    ) -> WriteOutcome:
        if not processes:
            reason = "processes=False: the workers are threads of this process"
            audit = self._dsw_audit
            audit("cgroup.write.skipped", reason="threads", detail=reason)
            return WriteOutcome(enforced=False, written=False, reason="threads")
        child, outcome = make_worker_cgroup(m, budget, opts, self._dsw_audit)
        if opts.mode == "required" and child is None:
            raise RuntimeError(
                f"cgroup_write='required', but the kernel limit could not be set ({outcome.reason})"
            )
        self._dsw_child = child
        if child is not None:
            self._dsw_undo.append(self._dsw_remove_child)
        return outcome

    def _dsw_remove_child(self) -> None:
        assert self._dsw_child is not None
        self._dsw_kept = self._dsw_child.remove(self._dsw_audit)

    def _dsw_plan_file(
        self,
        m: Any,
        plan: Any,
        outcome: WriteOutcome,
        opts: WriteOptions,
        following: bool,
        pool: Pool | None,
        member: Any,
        env: dict[str, str],
    ) -> None:
        from ..plan_file import plan_document, record_plan

        argv = [
            "LocalCluster",
            f"n_workers={plan.n_workers}",
            f"threads_per_worker={plan.nthreads}",
            f"processes={self._dsw_processes}",
        ]
        document = plan_document(m, plan, argv, outcome, opts.mode)
        document["following"] = following
        document["pool"] = (
            None
            if pool is None or member is None
            else {"key": pool.key, "directory": str(pool.directory)}
        )
        path = record_plan(None, document, self._dsw_audit)
        if path is not None:
            env[PLAN_EXPORT_ENV] = path
            self._dsw_undo.append(lambda: _unlink(path))

    def _dsw_worker_options(
        self, processes: bool, env: dict[str, str], following: bool, kwargs: dict[str, Any]
    ) -> None:
        if not processes:
            # dask-safe-audit reads these in the worker's process: here, the kernel's.
            for key in (PLAN_EXPORT_ENV, LIVE_FILE_ENV):
                if key in env:
                    self._dsw_env[key] = os.environ.get(key)
                    os.environ[key] = env[key]
            return
        import dask

        preload = kwargs.get("preload")
        if preload is None:
            # A preload given makes dask skip the configured ones: they keep running.
            preload = dask.config.get("distributed.worker.preload", default=[])
            kwargs.setdefault(
                "preload_argv", dask.config.get("distributed.worker.preload-argv", default=[])
            )
        ours = [JOIN_PRELOAD, *([FOLLOW_PRELOAD] if following else [])]
        kwargs["preload"] = [*([preload] if isinstance(preload, str) else preload), *ours]
        kwargs["env"] = {**env, **(kwargs.get("env") or {})}

    def _dsw_watch(self, spec_file: str, release: Any) -> None:
        import json

        from ..follow.decide import FollowSpec

        with open(spec_file, encoding="utf-8") as f:
            spec = FollowSpec.from_json(json.load(f))
        watch = NotebookWatch(
            spec,
            self._dsw_audit,
            release=release,
            child=self._dsw_child,
            worker_pids=self._dsw_worker_pids,
            held_in_process=self._dsw_held_in_process,
        )
        report_started(watch, self._dsw_audit)
        self._dsw_thread = FollowThread(watch, self._dsw_apply)
        self._dsw_undo.append(self._dsw_stop_watch)

    def _dsw_stop_watch(self) -> None:
        thread = self._dsw_thread
        if thread is not None:
            thread.stop()
            thread.watch.close()

    # -- while it runs (called from the follow thread) -----------------------------------

    def _dsw_worker_pids(self) -> list[int]:
        if not self._dsw_processes:
            return []
        return [pid for w in list(self.workers.values()) if (pid := getattr(w, "pid", None))]

    def _dsw_held_in_process(self) -> int:
        """With threads, what the workers hold: their managed memory, in this process."""
        total = 0
        for w in list(self.workers.values()):
            with contextlib.suppress(AttributeError):
                total += int(w.state.nbytes)
        return total

    def _dsw_apply(self, record: LiveLimit) -> None:
        servers = list(self.workers.items())
        if all(self._dsw_held.get(str(name)) == record.generation for name, _ in servers):
            return
        loop = self.loop
        if loop is not None:
            loop.add_callback(self._dsw_apply_in_loop, record)

    def _dsw_apply_in_loop(self, record: LiveLimit) -> None:
        """The new limit on what lives in this process: each nanny (it restarts its
        worker at 95 % of it, and hands it to the worker it restarts), or each threaded
        worker and the scheduler's view of it. Acknowledged as the preloads do."""
        from ..follow.scheduler import set_worker_memory_limit
        from ..follow.worker import apply_local

        thread = self._dsw_thread
        if thread is None:
            return
        channel = thread.watch.spec.channel
        for name, server in list(self.workers.items()):
            key = str(name)
            if self._dsw_held.get(key) == record.generation:
                continue
            if self._dsw_processes:
                server.memory_manager.memory_limit = record.per_worker
                role = "nanny"
            else:
                apply_local(server, record.per_worker)
                if self.scheduler is not None and server.address:
                    set_worker_memory_limit(server.address, record.per_worker, self.scheduler)
                role = "worker"
            slot = self._dsw_slots.setdefault(key, len(self._dsw_slots))
            with contextlib.suppress(OSError):
                write_ack(channel, role, os.getpid(), record.generation, slot)
            self._dsw_held[key] = record.generation

    # -- close ---------------------------------------------------------------------------

    async def _close(self) -> None:
        try:
            await super()._close()  # type: ignore[no-untyped-call]
        finally:
            self._dsw_cleanup()

    def _dsw_cleanup(self) -> None:
        """Undo in reverse order, once: the thread, the channel, the child (after the
        workers), the plan file, the claim."""
        undo = getattr(self, "_dsw_undo", [])
        if not undo:
            return
        while undo:
            step = undo.pop()
            with contextlib.suppress(Exception):
                step()
        child = getattr(self, "_dsw_child", None)
        audit = self._dsw_audit
        audit(
            "notebook.closed",
            child=None if child is None else child.path,
            child_kept=getattr(self, "_dsw_kept", None),
        )
        for key, value in getattr(self, "_dsw_env", {}).items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._dsw_env = {}


def _member_now(pool: Pool, plan: Any, outcome: WriteOutcome, child: WorkerCgroup | None) -> Any:
    """Our claim with the child its workers run in (the others read its working set from
    the kernel), and without a kernel limit only Dask's side as what we hold."""
    member = next((mb for mb in pool.members() if mb.pid == os.getpid()), None)
    if member is None:
        return None
    changed = member
    if child is not None:
        changed = replace(changed, cgroup=child.directory)
    if not outcome.enforced and plan.effective_per_worker is not None:
        dask_side = plan.n_workers * plan.effective_per_worker + plan.overhead
        changed = replace(changed, committed=min(member.committed, dask_side))
    if changed != member:
        with contextlib.suppress(OSError):
            pool.update(changed)
    return changed


def _unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _remove_spec_dir(spec_file: str) -> None:
    from ..follow.live_limit import remove_channel

    directory = os.path.dirname(spec_file)
    remove_channel(os.path.join(directory, "live.json"))
    _unlink(spec_file)
    with contextlib.suppress(OSError):
        os.rmdir(directory)


__all__ = ["LocalCluster", "local_cluster_counts"]
