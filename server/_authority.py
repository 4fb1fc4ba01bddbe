"""The authority process: lease table, store, scheduler and gRPC server wired together."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import pathlib
import socket
import threading
from collections.abc import Callable, Iterable

import grpc
from opentelemetry import metrics, trace
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from session_authority.v1 import session_authority_pb2 as pb

from ._audit import DEFAULT_MAX_BYTES as DEFAULT_AUDIT_MAX_BYTES
from ._audit import MIN_MAX_BYTES as MIN_AUDIT_MAX_BYTES
from ._audit import AuditLog, AuditSink
from ._audit_events import SessionRecorder
from ._auth import Authenticator, MtlsAuthenticator
from ._clock import Clock, SystemClock
from ._etcd_store import (
    DEFAULT_PREFIX as DEFAULT_ETCD_PREFIX,
    EtcdLeaseStore,
    MirroredLease,
    ReplicaState,
    check_endpoints,
    check_prefix,
    check_replica_id,
    check_tls,
)
from ._limits import PrincipalLimiter
from ._policy import Policy
from ._scheduler import ExpiryScheduler
from ._servicer import AuthorityServicer, add_servicer_to_server, encode_watched_end
from ._store import ClockAnchor, ClockAnchorStore, LeaseStore, SqliteLeaseStore, StoredLease, StoreError
from ._table import EndReason, LeaseRecord, LeaseSnapshot, LeaseState, LeaseTable, SessionEnd
from ._telemetry import SessionTelemetry
from ._watch import DEFAULT_REPLAY_SIZE, WatchHub

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SessionAuthority"].full_name
HOUSEKEEPING_INTERVAL_SECONDS = 0.5
AUDIT_DIRECTORY_NAME = "audit"
"""Subdirectory of the data directory that contains the audit log."""
AUDIT_CLOSE_TIMEOUT_SECONDS = 5.0


DEFAULT_RESTART_GRACE_SECONDS = 2.0
"""Covers an enforcer's reconnect (its channel backs off at most 0.5 s) and its next keep-alive."""


@dataclasses.dataclass
class AuthorityConfig:
    """Settings of one authority process.

    Attributes:
        listen: ``HOST:PORT`` to bind; port 0 picks a free port.
        data_dir: Directory of the lease store; None keeps nothing on disk
            (tests and benchmarks only: a restart loses every lease).
        policy: Tiers, method rules, exempt methods and admins.
        authenticator: Decides who is asking, for grants and admin calls.
        admin_everyone: Treat every caller as admin (insecure development mode).
        server_credentials: TLS credentials; None serves plaintext.
        heartbeat_interval_seconds: Maximum silence on a watch stream.
        restart_grace_seconds: How long after serving starts the leases
            restored from the store may still end by idle timeout at their
            old deadline. Enforcers reconnect in that time and report the
            activity they saw while the authority was away, with when it
            happened. A restored lease that idled out meanwhile stays alive
            for at most this long and then ends, dated at its deadline.
        ended_retention_seconds: How long ended leases are reported as ended
            rather than not found.
        clock: Time source; tests pass a ``ManualClock``.
        audit: Keep the audit log in ``<data_dir>/audit/``; ignored without
            a data directory.
        audit_fail_closed: Reject grants with ``UNAVAILABLE`` while the
            audit log cannot be written. Ends and renewals go on.
        audit_log_factory: Opens the audit log of a directory; tests pass
            one that injects write failures.
        audit_max_backoff_seconds: Maximum wait between retries of a
            failed audit write.
        audit_max_bytes: Size at which ``audit.jsonl`` is rotated. The
            authority keeps an index of the event IDs in the current and the
            previous file, about 180 bytes per record, so this also bounds
            that memory: about 55 MiB at the default of 64 MiB, with records
            of about 430 bytes.
        watch_replay_size: Recent ends kept for watchers that resume with
            ``after_sequence``, about 310 bytes each (20 MiB at the default
            of 65,536). A watcher that was away for more ends than this
            resets its cache instead of catching up.
        tracer_provider: Where spans go; None uses the global provider
            (a no-op unless the process installed the SDK).
        meter_provider: Where metrics go; None uses the global provider.
        store: ``"sqlite"`` keeps leases in ``<data_dir>/leases.db``;
            ``"etcd"`` shares them with other replicas in etcd, and
            ``data_dir`` then holds only the audit log.
        etcd_endpoints: etcd client URLs (``http://HOST:PORT``, or
            ``https://HOST:PORT`` for TLS), for the etcd store.
        etcd_credentials: TLS credentials towards ``https`` etcd endpoints
            (a CA, and a client certificate for etcd's
            ``--client-cert-auth``); None trusts the system's roots and
            sends no client certificate.
        etcd_server_name: The name that the etcd members' certificates must
            contain; "" checks the host of the single ``https`` endpoint.
            Several ``https`` endpoints need it.
        replica_id: This replica's name in etcd; empty takes the host name.
            It must be unique in the fleet and kept across restarts.
        etcd_prefix: Prefix of every key the etcd store writes.
    """

    authenticator: Authenticator
    listen: str = "127.0.0.1:0"
    data_dir: pathlib.Path | None = None
    policy: Policy = dataclasses.field(default_factory=Policy.default)
    admin_everyone: bool = False
    server_credentials: grpc.ServerCredentials | None = None
    heartbeat_interval_seconds: float = 1.0
    restart_grace_seconds: float = DEFAULT_RESTART_GRACE_SECONDS
    ended_retention_seconds: float = 3600.0
    clock: Clock = dataclasses.field(default_factory=SystemClock)
    audit: bool = True
    audit_fail_closed: bool = False
    audit_log_factory: Callable[[pathlib.Path], AuditLog] | None = None
    audit_max_backoff_seconds: float = 2.0
    audit_max_bytes: int = DEFAULT_AUDIT_MAX_BYTES
    watch_replay_size: int = DEFAULT_REPLAY_SIZE
    tracer_provider: trace.TracerProvider | None = None
    meter_provider: metrics.MeterProvider | None = None
    store: str = "sqlite"
    etcd_endpoints: tuple[str, ...] = ()
    replica_id: str = ""
    etcd_prefix: str = DEFAULT_ETCD_PREFIX
    etcd_credentials: grpc.ChannelCredentials | None = None
    etcd_server_name: str = ""

    def __post_init__(self) -> None:
        if self.store not in ("sqlite", "etcd"):
            raise ValueError(f'store must be "sqlite" or "etcd", got {self.store!r}')
        if type(self.audit_max_bytes) is not int or self.audit_max_bytes < MIN_AUDIT_MAX_BYTES:
            raise ValueError(
                f"audit_max_bytes must be an integer of at least {MIN_AUDIT_MAX_BYTES}, got {self.audit_max_bytes!r}"
            )
        if type(self.watch_replay_size) is not int or self.watch_replay_size < 1:
            raise ValueError(f"watch_replay_size must be a positive integer, got {self.watch_replay_size!r}")
        if self.store == "etcd":
            if not self.etcd_endpoints:
                raise ValueError("the etcd store needs etcd_endpoints, for example ('http://127.0.0.1:2379',)")
            if not self.replica_id:
                self.replica_id = socket.gethostname()
            check_replica_id(self.replica_id)
            check_prefix(self.etcd_prefix)
            check_tls(
                check_endpoints(self.etcd_endpoints),
                credentials=self.etcd_credentials is not None,
                server_name=self.etcd_server_name,
            )
        elif self.etcd_credentials is not None or self.etcd_server_name:
            raise ValueError('etcd_credentials and etcd_server_name apply only to store="etcd"')
        if isinstance(self.authenticator, MtlsAuthenticator) and self.server_credentials is None:
            raise ValueError(
                "MtlsAuthenticator needs server_credentials that require client certificates;"
                " build them with grpc.ssl_server_credentials(..., root_certificates=CA,"
                " require_client_auth=True)"
            )


class Persistence:
    """Writes grants, ends and activity of the lease table to its store.

    Store rows use authority time: the table's monotonic reading plus an
    offset chosen at start-up (see ``_store``). On the boot of the clock
    anchor saved in the store the offset is the saved one, so a restart adds
    no time to any lease. Otherwise it is chosen so that authority time never
    runs behind any time persisted before. Without a store every write
    completes at once.
    """

    def __init__(self, table: LeaseTable, store: LeaseStore | None, high_water: float) -> None:
        self._table = table
        self._store = store
        # Set by the authority, and called when each grant write settles.
        self.recorder: SessionRecorder | None = None
        self.offset = self._choose_offset(high_water)
        self._end_futures: dict[bytes, concurrent.futures.Future[None]] = {}
        self._lock = threading.Lock()

    def _choose_offset(self, high_water: float) -> float:
        """Return authority time minus monotonic time for this run, saving it as the store's clock anchor.

        It blocks while the store reads its anchor, so it runs once, at start-up.
        """
        clock = self._table.clock
        store = self._store if isinstance(self._store, ClockAnchorStore) else None
        boot_id = clock.boot_id()
        saved = store.load_clock_anchor() if store is not None else None
        monotonic = clock.monotonic()
        if saved is not None and saved.boot_id == boot_id:
            # The monotonic clock has run on since the crash or stop, so the
            # saved offset counts the downtime exactly. The wall clock is not
            # read, because a step or slew of it while the authority was down
            # would shift every restored deadline by as much.
            if monotonic + saved.offset >= high_water:
                logger.info("authority time continues on the monotonic clock of boot %s", boot_id)
                return saved.offset
            logger.warning(
                "the saved clock anchor of boot %s puts authority time %.3f s behind the stored high-water"
                " mark (a monotonic clock that is not the one the anchor was saved with); anchoring on"
                " the wall clock instead",
                boot_id,
                high_water - (monotonic + saved.offset),
            )
        # The monotonic clock is read first, so a pause before the wall
        # reading makes the offset larger, which only shortens restored leases.
        offset = max(clock.wall(), high_water) - monotonic
        if store is not None and boot_id is not None:
            store.save_clock_anchor(ClockAnchor(boot_id=boot_id, offset=offset))
        logger.info(
            "authority time anchored on the wall clock (saved anchor: %s, boot: %s)",
            saved.boot_id if saved is not None else "none",
            boot_id or "unknown",
        )
        return offset

    def to_authority_time(self, monotonic: float) -> float:
        return monotonic + self.offset

    def from_authority_time(self, authority_time: float) -> float:
        return authority_time - self.offset

    def save_grant(self, lease: LeaseSnapshot) -> concurrent.futures.Future[None]:
        future = self._store_grant(lease)
        recorder = self.recorder
        if recorder is not None:
            future.add_done_callback(lambda done: recorder.grant_settled(lease, done))
        return future

    def _store_grant(self, lease: LeaseSnapshot) -> concurrent.futures.Future[None]:
        if self._store is None:
            return _done()
        recorder = self.recorder
        return self._store.save_grant(
            StoredLease(
                digest=lease.digest,
                principal=lease.principal,
                tier=lease.tier,
                idle_timeout=lease.idle_timeout,
                max_duration=lease.max_duration,
                granted_at=self.to_authority_time(lease.granted_at),
                granted_wall=lease.granted_wall,
                last_activity=self.to_authority_time(lease.last_activity),
                grant_span=recorder.telemetry.grant_traceparent(lease.digest) if recorder is not None else "",
            )
        )

    def record_activity(self, leases: Iterable[LeaseSnapshot]) -> None:
        alive = [lease for lease in leases if lease.alive]
        if self.recorder is not None:
            self.recorder.telemetry.renewed(len(alive))
        if self._store is None:
            return
        for lease in alive:
            self._store.save_activity(lease.digest, self.to_authority_time(lease.last_activity))

    def end_written(self, digest: bytes) -> concurrent.futures.Future[None]:
        """Return the future of the store write for a lease's end; a done one once the write succeeded."""
        with self._lock:
            future = self._end_futures.get(digest)
        return future if future is not None else _done()

    def _forget_written_end(self, digest: bytes, future: concurrent.futures.Future[None]) -> None:
        if future.cancelled() or future.exception() is None:
            with self._lock:
                if self._end_futures.get(digest) is future:
                    del self._end_futures[digest]

    def housekeeping(self) -> None:
        """Advance the clock high-water mark and drop ended rows past retention."""
        if self._store is None:
            return
        now = self.to_authority_time(self._table.clock.monotonic())
        self._store.set_high_water(now)

    def purge(self) -> None:
        if self._store is not None:
            now = self.to_authority_time(self._table.clock.monotonic())
            self._store.purge_ended_before(now - self._table.ended_retention_seconds)

    # Table listener interface.

    def on_grant(self, lease: LeaseSnapshot) -> None:
        """Grants are written by the servicer, which waits for the write."""

    def on_end(self, end: SessionEnd) -> None:
        # An end that another replica decided is already in the shared store.
        if self._store is None or end.decided_elsewhere:
            return
        lease = end.lease
        future = self._store.save_end(
            lease.digest,
            self.to_authority_time(end.ended_at),
            lease.ended_wall if lease.ended_wall is not None else self._table.clock.wall(),
            int(lease.end_reason) if lease.end_reason is not None else 0,
            lease.revoked_by,
        )
        recorder = self.recorder
        if recorder is not None:
            # The end's audit record waits for the store, so a crash can never
            # leave the audit log ahead of the store with another reason.
            future.add_done_callback(lambda done, digest=lease.digest: recorder.end_settled(digest, done))
        if lease.end_reason in (EndReason.REVOKED, EndReason.RELEASED):
            # Only revokes and releases wait for the write. The future stays
            # until the write succeeds, so a revoke repeated before then waits
            # for the same write instead of reporting an end that may not last.
            with self._lock:
                self._end_futures[lease.digest] = future
            future.add_done_callback(lambda done, digest=lease.digest: self._forget_written_end(digest, done))

    def record_of(self, row: StoredLease) -> LeaseRecord:
        """Return the table record of a stored row, its times converted to this run's monotonic scale."""
        record = LeaseRecord(
            digest=row.digest,
            principal=row.principal,
            tier=row.tier,
            idle_timeout=row.idle_timeout,
            max_duration=row.max_duration,
            granted_at=self.from_authority_time(row.granted_at),
            granted_wall=row.granted_wall,
            last_activity=self.from_authority_time(row.last_activity),
        )
        if row.ended_at is not None:
            record.end_reason = EndReason(row.end_reason) if row.end_reason else EndReason.REVOKED
            record.ended_at = self.from_authority_time(row.ended_at)
            record.ended_wall = row.ended_wall
            record.revoked_by = row.revoked_by
        return record

    def restore_into_table(self, rows: Iterable[StoredLease]) -> tuple[int, int]:
        """Load stored rows into the table; return (live, ended) counts."""
        live = ended = 0
        for row in rows:
            record = self.record_of(row)
            if row.ended_at is not None:
                ended += 1
            else:
                live += 1
            self._table.restore(record)
        return live, ended


def _done() -> concurrent.futures.Future[None]:
    future: concurrent.futures.Future[None] = concurrent.futures.Future()
    future.set_result(None)
    return future


class ReplicaMirror:
    """Keeps this replica's lease table in step with the leases that all replicas share in etcd.

    It is the etcd store's ``ReplicaListener``, so its methods run on the
    store's event loop and do table work only. Stored times are authority
    time of the replica that wrote them. The mirror converts them to this
    table's clock and caps them at the moment the change arrived
    (``LeaseTable.mirror_stored``).

    Args:
        table: This replica's lease table.
        persistence: Converts between authority time and the table's clock.
        store: The etcd store.
        replica_id: This replica's name, to tell its own grants from others'.
        limiter: Counts every live lease of the fleet against its principal;
            the mirror adds the leases that other replicas granted.
    """

    def __init__(
        self,
        table: LeaseTable,
        persistence: Persistence,
        store: EtcdLeaseStore,
        replica_id: str,
        limiter: PrincipalLimiter | None = None,
    ) -> None:
        self._table = table
        self._limiter = limiter
        self._persistence = persistence
        self._store = store
        self._replica_id = replica_id

    def restore(self, state: ReplicaState) -> tuple[int, int]:
        """Load the leases read at start-up into the table; return (live, ended) counts."""
        now = self._table.clock.monotonic()
        live = ended = 0
        for mirrored in state.leases:
            record = self._record_of(mirrored)
            if record.end_reason is None:
                self._table.mirror_stored(record, now)
                live += 1
            else:
                self._table.mirror_ended(record, now)
                ended += 1
        return live, ended

    def owed_records(self, state: ReplicaState) -> tuple[list[StoredLease], set[bytes]]:
        """Return the rows whose audit records this replica owes, and the digests to write no grant record for.

        A replica owes the grant record of every lease it granted, and the
        end records of every end it claimed whose ``audit-pending`` key is
        still in etcd.
        """
        rows: list[StoredLease] = []
        skip_grants: set[bytes] = set()
        found: set[bytes] = set()
        for mirrored in state.leases:
            row, digest = mirrored.lease, mirrored.lease.digest
            granted_here = mirrored.granted_by == self._replica_id
            owes_end = row.ended_at is not None and digest in state.audit_pending
            if owes_end:
                found.add(digest)
                rows.append(row)
                if not granted_here:
                    skip_grants.add(digest)
            elif granted_here:
                rows.append(dataclasses.replace(row, ended_at=None, ended_wall=None, end_reason=None, revoked_by=""))
        for digest in state.audit_pending - found:
            logger.error(
                "end of lease %s was claimed by this replica, but its record is gone from etcd (past retention);"
                " its audit record cannot be written",
                digest[:6].hex(),
            )
        return rows, skip_grants

    def _record_of(self, mirrored: MirroredLease) -> LeaseRecord:
        record = self._persistence.record_of(mirrored.lease)
        record.granted_here = mirrored.granted_by == self._replica_id
        return record

    # ReplicaListener interface.

    def lease_stored(self, lease: MirroredLease) -> None:
        added = self._table.mirror_stored(self._record_of(lease), self._table.clock.monotonic())
        if added and self._limiter is not None:
            self._limiter.load([lease.lease.principal])

    def lease_ended(self, lease: MirroredLease) -> None:
        self._table.mirror_ended(self._record_of(lease), self._table.clock.monotonic())

    def lease_deleted(self, digest: bytes) -> None:
        # The end goes through this replica's claim, which finds nothing in
        # etcd, so no replica writes an audit record for it.
        snapshot, already_ended = self._table.end(digest, EndReason.REVOKED)
        if snapshot.state is not LeaseState.NOT_FOUND and not already_ended:
            logger.warning("lease %s was deleted from etcd without an end record; ended as revoked", snapshot.fingerprint)

    async def fetch_into_table(self, digest: bytes) -> bool:
        """Read a lease that the table lacks from etcd into the table; return whether etcd had it."""
        try:
            mirrored = await asyncio.wrap_future(self._store.fetch(digest))
        except StoreError as exc:
            logger.debug("lease %s not read from etcd: %s", digest[:6].hex(), exc)
            return False
        if mirrored is None:
            return False
        if mirrored.lease.ended_at is None:
            self.lease_stored(mirrored)
        else:
            self.lease_ended(mirrored)
        return True


class Authority:
    """One authority: call ``start`` on the event loop that will serve it.

    Args:
        config: The settings.
    """

    def __init__(self, config: AuthorityConfig) -> None:
        self.config = config
        self.table = LeaseTable(config.clock, ended_retention_seconds=config.ended_retention_seconds)
        self.store: LeaseStore | None = None
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._scheduler: ExpiryScheduler | None = None
        self._housekeeping: asyncio.Task[None] | None = None
        self.persistence: Persistence | None = None
        self.hub: WatchHub | None = None
        self.servicer: AuthorityServicer | None = None
        self.limiter = PrincipalLimiter(config.policy.limits, self.table.clock)
        self.telemetry = SessionTelemetry(config.tracer_provider, config.meter_provider)
        self.audit_log: AuditLog | None = None
        self.audit_sink: AuditSink | None = None
        self.recorder: SessionRecorder | None = None
        self.mirror: ReplicaMirror | None = None

    @property
    def target(self) -> str:
        host = self.config.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    def _warn_of_tiers_not_in_policy(self, restored: Iterable[StoredLease]) -> None:
        """Log the live restored leases whose tier the policy no longer has.

        Such a lease keeps the idle timeout and maximum duration it was
        granted with until it ends; dropping a tier does not end its leases.
        """
        tiers = self.config.policy.tiers
        counts = collections.Counter(row.tier for row in restored if row.tier not in tiers)
        # Only the few leases of dropped tiers are looked up: those that ended while down no longer count.
        alive = collections.Counter(
            row.tier
            for row in restored
            if row.tier in counts and self.table.lookup_digest(row.digest).state is LeaseState.ALIVE
        )
        if not alive:
            return
        listed = ", ".join(f"{tier!r} ({count})" for tier, count in sorted(alive.items()))
        logger.warning(
            "%d restored live leases are in tiers the policy no longer has: %s. They keep the idle timeout and"
            " maximum duration they were granted with until they end. 'session-authority lease list --tier NAME'"
            " lists them, and 'lease revoke --fingerprint' ends one now",
            sum(alive.values()),
            listed,
        )

    async def start(self) -> int:
        """Load the store, start expiry and serve; return the bound port.

        Raises:
            StoreError: The data directory cannot be opened or read.
            AuditWriteError: The audit log cannot be opened or resumed.
            RuntimeError: The listen address cannot be bound.
        """
        config = self.config
        high_water = 0.0
        rows: list[StoredLease] = []
        replica_state: ReplicaState | None = None
        if config.store == "etcd":
            etcd_store = self._open_etcd_store()
            replica_state = await asyncio.get_running_loop().run_in_executor(None, self._load_etcd, etcd_store)
            high_water = replica_state.high_water
        elif config.data_dir is not None:
            self.store = SqliteLeaseStore(config.data_dir)
            state = self.store.load()
            rows, high_water = state.leases, state.high_water
        self.persistence = Persistence(self.table, self.store, high_water)
        skip_grant_records: set[bytes] = set()
        if replica_state is not None:
            self.mirror = ReplicaMirror(self.table, self.persistence, etcd_store, config.replica_id, self.limiter)
            live, ended = self.mirror.restore(replica_state)
            rows, skip_grant_records = self.mirror.owed_records(replica_state)
            # Every live lease of the fleet counts against its principal's limit; only
            # leases granted here count in this replica's metrics.
            fleet_live = [m.lease for m in replica_state.leases if m.lease.ended_at is None]
            local_live = [m.lease for m in replica_state.leases if m.lease.ended_at is None and m.granted_by == config.replica_id]
        else:
            live, ended = self.persistence.restore_into_table(rows)
            local_live = fleet_live = [row for row in rows if row.ended_at is None]
        self.telemetry.lease_restored(row.tier for row in local_live)
        self.telemetry.restore_grant_contexts((row.digest, row.grant_span) for row in local_live if row.grant_span)
        # Until enforcers have reconnected and reported what they saw while
        # this authority was away, an active lease's stored activity is too old.
        self.table.hold_idle_ends()
        chain_start_time: float | None = None
        if config.data_dir is not None and config.audit:
            chain_start_time = self._open_audit(config.data_dir / AUDIT_DIRECTORY_NAME)
        self.recorder = SessionRecorder(
            self.audit_sink, self.telemetry, self.table.sequence + 1, ends_wait_for_store=self.store is not None
        )
        self.persistence.recorder = self.recorder
        if isinstance(self.store, EtcdLeaseStore):
            self.recorder.end_recorded = self.store.clear_audit_pending
        # Records that a crash kept from the log are written again first.
        # The log skips the event IDs it already contains. Grant records of
        # leases granted before this chain started belong to an earlier one.
        self.recorder.resubmit_stored(rows, skip_grant_records=skip_grant_records, chain_start_time=chain_start_time)

        loop = asyncio.get_running_loop()
        self.hub = WatchHub(
            loop, encode_watched_end, replay_size=self.config.watch_replay_size, first_sequence=self.table.sequence + 1
        )
        self.table.add_listener(self.persistence)
        self.table.add_listener(self.hub)
        self.table.add_listener(self.recorder)
        # Restored live leases count against their principal's limit. The limiter listens
        # before expire_due, so leases that ended while the authority was down free their slot.
        self.limiter.load(row.principal for row in fleet_live)
        self.table.add_listener(self.limiter)
        if self.mirror is not None:
            assert isinstance(self.store, EtcdLeaseStore)
            # From the revision of the start-up read on, so no change is missed.
            self.store.start_watch(self.mirror)
        # Leases whose deadline passed while the authority was down end now,
        # once, with their deadline as end time and their true reason. The
        # recorder is attached first, so each of these ends is audited.
        ended_while_down = self.table.expire_due()
        logger.info(
            "restored %d live and %d ended leases; %d ended while the authority was down",
            live - ended_while_down,
            ended,
            ended_while_down,
        )
        self._warn_of_tiers_not_in_policy(local_live)
        self._scheduler = ExpiryScheduler(self.table)
        self._scheduler.start()

        self.servicer = AuthorityServicer(
            self.table,
            config.policy,
            config.authenticator,
            self.persistence,
            self.hub,
            heartbeat_interval_seconds=config.heartbeat_interval_seconds,
            admin_everyone=config.admin_everyone,
            limiter=self.limiter,
            fetch_missing=self.mirror.fetch_into_table if self.mirror is not None else None,
            end_reply_timeout_seconds=(
                self.store.request_timeout_seconds if isinstance(self.store, EtcdLeaseStore) else None
            ),
        )
        if config.audit_fail_closed:
            self._close_grants_while_audit_fails()
        # gRPC enables SO_REUSEPORT by default, which would let a second
        # authority bind the same port and take half the calls.
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        add_servicer_to_server(self.servicer, server)
        health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            server,
        )
        try:
            if config.server_credentials is not None:
                port = server.add_secure_port(config.listen, config.server_credentials)
            else:
                port = server.add_insecure_port(config.listen)
        except RuntimeError:
            port = 0
        if port == 0:
            # Write the records queued at start, then close the audit log and
            # the store, so that a failed start leaves their files complete
            # and their locks free.
            await self.stop(0)
            raise RuntimeError(
                f"cannot listen on {config.listen}: the address is in use (another authority?) or invalid;"
                " stop the other process or choose another --listen address"
            )
        await server.start()
        self._server = server
        self.port = port
        idled_out = self.table.end_hold(config.restart_grace_seconds)
        if idled_out:
            logger.info(
                "%d restored leases are past their idle deadline; each ends in %g s, dated at its deadline,"
                " unless an enforcer reports activity from before it",
                idled_out,
                config.restart_grace_seconds,
            )
        self._housekeeping = asyncio.create_task(self._run_housekeeping())
        logger.info(
            "session authority serving on %s (transport: %s, store: %s, audit: %s, policy tiers: %s,"
            " authenticator: %s, limits: %d live leases and %g grants/s per principal)",
            self.target,
            "TLS" if config.server_credentials is not None else "plaintext",
            self.store.description if self.store else "memory only",
            self._audit_description(),
            ", ".join(sorted(config.policy.tiers)),
            config.authenticator.name,
            config.policy.limits.max_live_leases_per_principal,
            config.policy.limits.grants_per_second_per_principal,
        )
        return port

    def _open_etcd_store(self) -> EtcdLeaseStore:
        config = self.config
        store = EtcdLeaseStore(
            config.etcd_endpoints,
            replica_id=config.replica_id,
            prefix=config.etcd_prefix,
            retention_seconds=config.ended_retention_seconds,
            loop=asyncio.get_running_loop(),
            credentials=config.etcd_credentials,
            server_name=config.etcd_server_name,
        )
        self.store = store
        return store

    @staticmethod
    def _load_etcd(store: EtcdLeaseStore) -> ReplicaState:
        try:
            return store.load_replica()
        except BaseException:
            store.close()
            raise

    def _open_audit(self, directory: pathlib.Path) -> float | None:
        """Open the audit log and its sink; return the authority time at which the log's chain started, if known."""
        config = self.config
        assert self.persistence is not None
        try:
            if config.audit_log_factory is not None:
                self.audit_log = config.audit_log_factory(directory)
            else:
                self.audit_log = AuditLog(directory, max_bytes=config.audit_max_bytes, wall_clock=config.clock.wall)
            # NOTE: leases granted in this chain are distinguished from earlier
            # ones by authority time, which never runs behind the stored
            # high-water mark. That mark is written about every 0.5 s, so a
            # crash right after a new chain starts, followed by a boot with
            # the wall clock set back, can make a grant look earlier.
            now = self.persistence.to_authority_time(self.table.clock.monotonic())
            chain_start_time = self.audit_log.chain_start_time(now)
        except BaseException:
            if self.audit_log is not None:
                self.audit_log.close()
                self.audit_log = None
            if self.store is not None:
                self.store.close()
            raise
        self.audit_sink = AuditSink(
            self.audit_log,
            initial_backoff_seconds=min(0.05, config.audit_max_backoff_seconds),
            max_backoff_seconds=config.audit_max_backoff_seconds,
        )
        return chain_start_time

    def _close_grants_while_audit_fails(self) -> None:
        assert self.servicer is not None
        sink, log = self.audit_sink, self.audit_log
        if sink is None or log is None:
            logger.warning("fail-closed audit has no effect: this authority keeps no audit log (no data directory)")
            return
        refusal = (
            f"the audit log in {log.directory} cannot be written, and this authority runs with fail-closed"
            " audit, so it grants no lease until the log can be written again; retry later"
        )
        self.servicer.grant_gate = lambda: None if sink.healthy else refusal

    def _audit_description(self) -> str:
        if self.audit_log is None:
            return "off"
        mode = "fail-closed" if self.config.audit_fail_closed else "fail-open"
        return f"{self.audit_log.directory} ({mode})"

    def _close_audit(self) -> None:
        """Write the queued audit records, then close the log (blocks; run it off the event loop)."""
        sink, log = self.audit_sink, self.audit_log
        if sink is None or log is None:
            return
        if not sink.close(AUDIT_CLOSE_TIMEOUT_SECONDS):
            logger.error(
                "audit records still queued at stop are not written; the next start writes the"
                " records of leases found in the store again"
            )
        # The log keeps its last seq and hash in last-hash.json, which
        # `audit verify` reads to detect records cut from the end.
        logger.info("audit log %s closed at seq %d, last hash %s", log.directory, log.last_seq, log.last_hash)
        log.close()

    def flush(self, timeout_seconds: float = 10.0) -> bool:
        """Wait until queued store writes and the audit records they release have landed.

        For tests and tools; may block, so do not call it on the event loop.
        """
        if isinstance(self.store, (SqliteLeaseStore, EtcdLeaseStore)):
            self.store.flush(timeout_seconds)
        if self.audit_sink is not None:
            return self.audit_sink.flush(timeout_seconds)
        return True

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def stop(self, grace_seconds: float = 1.0) -> None:
        """Stop serving, stop expiry and flush the store."""
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        if self._server is not None:
            await self._server.stop(grace_seconds)
        if self._scheduler is not None:
            self._scheduler.stop()
        if self.persistence is not None:
            self.persistence.housekeeping()
        loop = asyncio.get_running_loop()
        if isinstance(self.store, (SqliteLeaseStore, EtcdLeaseStore)):
            # Ends release their audit records only once stored, so the store
            # is flushed before the audit log closes.
            try:
                await loop.run_in_executor(None, self.store.flush, 10.0)
            except StoreError:
                logger.exception("lease store did not flush before stop; a restart writes the records")
        await loop.run_in_executor(None, self._close_audit)
        if self.store is not None:
            await loop.run_in_executor(None, self.store.close)
        logger.info("session authority on %s stopped", self.target)

    async def _run_housekeeping(self) -> None:
        assert self.persistence is not None
        rounds = 0
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL_SECONDS)
            self.persistence.housekeeping()
            rounds += 1
            if rounds % 120 == 0:
                self.persistence.purge()


class AuthorityThread:
    """Runs an ``Authority`` on its own event loop in a background thread.

    For embedding in synchronous programs and for tests.

    Args:
        config: The settings.
    """

    def __init__(self, config: AuthorityConfig) -> None:
        self.authority = Authority(config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="session-authority", daemon=True)

    @property
    def target(self) -> str:
        return self.authority.target

    def start(self) -> AuthorityThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.authority.start(), self._loop).result(timeout=30)
        return self

    def stop(self, grace_seconds: float = 0.5) -> None:
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self.authority.stop(grace_seconds), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> AuthorityThread:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

