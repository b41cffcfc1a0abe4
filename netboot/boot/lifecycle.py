"""The one module that moves a node between lifecycle states.

Protocols only report what happened; this module decides what it means::

    a new node: may it be?        admit()     -> None, or a Refusal to ask again later
    DHCP offer to a new UUID      offered()   -> discovered   (queued, batched)
    boot script / pxelinux config served()    -> booting, or error (config broken)
    loader sent, firmware DHCPs   loader_sent(), offered() -> error: the firmware refused
      again (not iPXE) in a window                        the loader (:mod:`.refusals`)
    kernel, initrd or OEM fetched fetched()   -> deploying    (only from booting)
    the OS calls back             reported()  -> installed / error, or identity
    deploying too long            check_stuck() -> a 'stuck' event (state unchanged)
    an admin                      patch(), forget()

``offered``, ``served`` and ``fetched`` run on reply paths: they change the
registry's in-memory index at once and queue the commit, never waiting for it,
and each makes at most one registry write. ``reported``, ``patch`` and
``forget`` answer API calls whose caller needs to know it is kept: they wait
for the commit.

Only here are nodes created, and every creation is within ``limits.new_nodes``
(:mod:`.newnodes`): a boot script or pxelinux config for a UUID the registry does
not know is refused with :meth:`admit` (the endpoint asks before the Booter
decides, so a flood costs no decision), and ``served`` takes the token when it
creates the node; a DHCP first contact over the limit is not recorded (the offer
still goes out: the machine is recorded when it asks for its script). An API
report needs the node's token, which netboot hands out only in a boot script (so
only to a node it admitted): reports are not limited.

Every change is published as a :class:`LifecycleEvent` to the listeners
(webhooks, metrics, the dashboard), after it is applied in memory.

A data dir that cannot be written must not stop boots: a failed commit is
counted, logged at most once a minute and reported by :attr:`problem`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..metrics import Counters
from ..power.bmc import BmcConfig
from ..power.driver import BmcError
from ..storage.registry import Change, Node, Registry, RegistryError
from ..util.ratelimit import RateLimitedLog
from .newnodes import NewNodeLimiter, Source, retry_after
from .refusals import Download, LoaderWatch
from .sightings import Sightings
from .spec import BootSpec, Client, Decision, LocalBoot, Offer, Refusal

if TYPE_CHECKING:
    from ..ignition.artifacts import Artifacts, NodeArtifacts
    from ..power.service import PowerService, PowerStatus
    from .bmcs import Bmcs
    from .booter import Booter

log = logging.getLogger("netboot.lifecycle")

#: first contacts waiting to be recorded; past this DHCP sightings are dropped (counted)
NOTE_QUEUE_SIZE = 10_000
NOTE_BATCH = 1_000
#: states a node must leave within stuck_after, or it is reported stuck
STUCK_STATES = ("deploying", "commissioning")
#: the reason of a node whose firmware would not run the loader it downloaded
REFUSED_REASON = "firmware refused the loader (Secure Boot?)"
#: refusal lines logged at once, refilled at two a second; the rest are summed up
REFUSAL_LOG_BURST = 20


class NotCommissioning(Exception):
    """An inventory from a node that is not commissioning."""


@dataclass(frozen=True, slots=True)
class Commissioning:
    """What a commissioning OS does next: ``set-bmc`` (to ``address``), ``wait`` (netboot
    is checking the BMC out of band; report again) or ``poweroff`` (done: 'ready')."""

    action: str
    address: str | None = None
    netmask: str | None = None
    gateway: str | None = None
    note: str = ""


@dataclass(frozen=True, slots=True)
class LifecycleEvent:
    """``kind``: a state entered (discovered, booting, deploying, installed, error) or
    ``stuck``. ``old`` is the node before the change (None when it was created)."""

    kind: str
    node: Node
    old: Node | None
    source: str
    time: float


Listener = Callable[[LifecycleEvent], None]


class Lifecycle:
    def __init__(self, registry: Registry | None, sightings: Sightings, counters: Counters, *,
                 booter: Booter | None = None, artifacts: Artifacts | None = None,
                 stuck_after: float = 1800.0, clock: Callable[[], float] = time.time,
                 problem: str | None = None, bmcs: Bmcs | None = None,
                 power: PowerService | None = None, limiter: NewNodeLimiter | None = None,
                 loaders: LoaderWatch | None = None):
        self.registry = registry
        #: loaders sent to firmware and not yet seen running (dhcp.refused_loader_window)
        self.loaders = loaders if loaders is not None else LoaderWatch()
        #: limits.new_nodes (None: unlimited)
        self.limiter = limiter
        self.sightings = sightings
        self.counters = counters
        self.booter = booter
        self.artifacts = artifacts
        #: which BMC each node has, and the service that talks to them (None: no registry)
        self.bmcs = bmcs
        self.power = power
        self.stuck_after = stuck_after
        self._clock = clock
        #: why boots are not recorded (no registry, full or read-only data dir), for /health
        self.problem = problem
        self._listeners: list[Listener] = []
        if registry is not None:  # a fleet: what other instances did reaches our listeners
            registry.on_remote = self._remote
        self._notes: asyncio.Queue[tuple[str, str, str]] = asyncio.Queue(NOTE_QUEUE_SIZE)
        self._queued: set[str] = set()  # UUIDs in _notes: one token, one note each
        self._stuck: set[str] = set()
        self._write_errors = RateLimitedLog(
            log, "cannot record boots: %d failed registry commit(s) (%s), latest: %s; still "
            "serving boot files and scripts: free space or fix permissions in %s",
            level=logging.ERROR)
        #: a rack of Secure Boot machines refused at once is a few lines, not one each
        self._refusal_log = RateLimitedLog(
            log, "%d more firmware refusal(s) not logged (%s; counted in "
            "loader_refused_total); latest: node %s", every=REFUSAL_LOG_BURST / 2.0,
            burst=REFUSAL_LOG_BURST)
        for name, text in (
            ("node_boots_total", "Boots counted by the registry (loader fetched)"),
            ("node_failures_total", "Nodes that went to 'error'"),
            ("node_stuck_total", "Nodes found stuck in 'deploying'"),
            ("registry_notes_dropped_total", "DHCP first contacts dropped: queue full"),
            ("registry_write_errors_total", "Registry commits that failed"),
            ("loader_downloads_total", "First-stage loaders sent in full, by transport"),
            ("loader_downloads_unmatched_total", "Loader downloads from an address no "
             "DHCPREQUEST was seen for (not watched for a firmware refusal)"),
            ("loader_refused_total", "Loaders the firmware downloaded and would not run "
             "(a fresh firmware DHCP request followed), by transport"),
        ):
            counters.describe(name, text)

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    # -- reports from the reply paths (never wait) ---------------------------------
    def offered(self, client: Client, offer: Offer) -> None:
        """A DHCP offer went out. A new UUID is recorded as 'discovered', queued; a
        firmware starting over right after its loader download refused the loader."""
        refused = self.loaders.attempt(client)
        if client.uuid is None:
            return
        uuid = client.uuid
        if refused is not None:
            self._refused(uuid, client.mac, refused)
        self.sightings.dhcp(client.mac, uuid)
        if self.registry is None or uuid in self._queued or self.registry.get(uuid) is not None:
            return
        if self._notes.full():
            self.counters.inc("registry_notes_dropped_total")
            return
        if self.limiter is not None and self.limiter.take(
                Source.dhcp(client.giaddr, client.agent), "dhcp", uuid) is not None:
            return
        self._queued.add(uuid)
        self._notes.put_nowait((uuid, client.mac, offer.profile))

    def leased(self, mac: str, address: str) -> None:
        """A PXE or HTTP Boot client asked the site's DHCP server for ``address``."""
        self.sightings.leased(mac, address)

    def loader_sent(self, address: str, name: str, transport: str) -> None:
        """First-stage loader ``name`` went in full to ``address`` (``tftp``, ``http``)."""
        self.counters.inc("loader_downloads_total", transport=transport)
        mac = self.sightings.mac_leased(address)
        if mac is None:
            self.counters.inc("loader_downloads_unmatched_total")
            return
        self.loaders.sent(mac, name, transport)

    def _refused(self, uuid: str, mac: str, download: Download) -> None:
        """The firmware at ``mac`` downloaded ``download`` and would not run it."""
        self.counters.inc("loader_refused_total", transport=download.transport)
        if self._refusal_log.allow(None, "over_rate", uuid):
            log.warning("node %s (mac %s): the firmware downloaded %s over %s and started "
                        "over %.0f s later without running it: %s", uuid, mac, download.name,
                        download.transport, download.waited, REFUSED_REASON)
        if self.registry is None or self.registry.get(uuid) is None:
            return  # not recorded (over limits.new_nodes, or no registry): counted only
        change = self.registry.set_state(uuid, "error", source="dhcp", reason=REFUSED_REASON)
        self.queue_commit()
        self._publish(change, "dhcp")

    def admit(self, uuid: str | None, mac: str | None, address: str,
              path: str) -> Refusal | None:
        """Before the Booter decides for ``uuid`` at ``address``: None if it may go on
        (a known node always may), else a Refusal that asks it to come back later
        (counted and logged). Takes nothing: :meth:`served` does, creating the node."""
        if self.limiter is None or not uuid or self.registry is None \
                or self.registry.get(uuid) is not None:
            return None
        wait = self.limiter.check(Source.address(address), path, uuid)
        if wait is None:
            return None
        retry = retry_after(wait)
        return Refusal(uuid, mac, f"too many new machines at once; asking again in {retry} s",
                       retry=retry)

    def served(self, decision: Decision, address: str, source: str,
               identity: dict[str, str | None] | None = None) -> None:
        """A boot script (``ipxe``) or pxelinux config (``tftp``) was handed to ``address``.

        A boot: the node is 'booting' (or 'error' when its config is broken), counted
        once, with what the loader told of the hardware (``identity``). Going to the
        local disk is not a boot and records nothing.
        """
        uuid, mac = decision.uuid, decision.mac
        self.sightings.booted(address, uuid, mac)
        # a loader that asks for its script or config runs: its firmware refused nothing
        if mac is not None:
            self.loaders.ran(mac)
        if (leased := self.sightings.mac_leased(address)) is not None:
            self.loaders.ran(leased)
        if isinstance(decision, LocalBoot):
            return
        oem = decision.oem
        if oem is not None and self.artifacts is not None:
            self.artifacts.issue(oem)  # a fetch serves exactly what this boot was promised
        if isinstance(decision, BootSpec) and oem is not None:
            self.sightings.grant(address, oem.uuid)
        if isinstance(decision, Refusal):
            if not decision.failed:
                return
            log.error("not booting %s (%s via %s, profile %s): %s", uuid or "-", address,
                      source, decision.profile or "-", decision.reason)
        if self.registry is None or not uuid:
            return
        reg = self.registry
        if reg.get(uuid) is None and self._take(uuid, address, source) is not None:
            return  # an endpoint that did not admit() first: not recorded, still bounded
        seen = reg.observe(uuid, mac=mac, address=address, source=source, boot=True,
                           hostname=decision.hostname, profile=decision.profile,
                           arch=decision.cpu if isinstance(decision, BootSpec) else None,
                           **(identity or {}))
        if seen.created:  # first contact through a loader (no DHCP sighting recorded)
            self._publish(seen, source)
        self.counters.inc("node_boots_total")
        if isinstance(decision, Refusal):
            change = reg.set_state(uuid, "error", source=source, address=address,
                                   reason=decision.reason)
        else:
            state = "commissioning" if decision.commission else "booting"
            change = reg.set_state(uuid, state, source=source, address=address)
        self.queue_commit()
        self._publish(change, source)

    def fetched(self, address: str, source: str) -> None:
        """A kernel, initrd or OEM archive went to ``address``: a booting node is deploying."""
        if self.registry is None:
            return
        uuid, _ = self.sightings.at(address)
        if uuid is None:
            return
        node = self.registry.get(uuid)
        if node is None or node.state != "booting":
            return
        change = self.registry.set_state(uuid, "deploying", source=source, address=address)
        self.queue_commit()
        self._publish(change, source)

    # -- what a node was handed ---------------------------------------------------
    def handed_out(self, uuid: str, address: str) -> NodeArtifacts | None:
        """The artefacts this node's boot was promised; rendered again (for the MAC it
        booted with) only when that was forgotten (LRU, restart)."""
        if self.artifacts is None:
            return None
        a = self.artifacts.issued(uuid)
        if a is None and self.booter is not None:
            booted_as, mac = self.sightings.at(address)
            if booted_as != uuid:
                node = self.registry.get(uuid) if self.registry is not None else None
                mac = node.macs[0] if node is not None and node.macs else None
            a, _ = self.booter.artifacts_for(mac, uuid)
        return a

    # -- API calls (acknowledged: they wait for the commit) -----------------------------
    async def reported(self, uuid: str, outcome: str, *, address: str | None,
                       reason: str | None = None,
                       identity: dict[str, Any] | None = None) -> Node:
        """The booted OS reports: ``installed``, ``failed`` (with reason) or ``register``
        (identity: serial, vendor, product, asset, hostname, mac, secure_boot)."""
        reg = self._registry()
        if outcome == "register":
            ident = dict(identity or {})
            change = reg.observe(uuid, mac=ident.pop("mac", None), address=address,
                                 source="api", **ident)
        elif outcome == "installed":
            change = reg.set_state(uuid, "installed", source="api", address=address)
        elif outcome == "failed":
            change = reg.set_state(uuid, "error", source="api", address=address, reason=reason)
        else:
            raise ValueError(f"unknown outcome {outcome!r}")
        self._publish(change, "api")
        await self._commit_now()
        return reg.get(change.node.uuid) or change.node

    async def patch(self, uuid: str, *, actor: str, **changes: Any) -> Node:
        """Re-arm, relabel, set profile or hostname (KeyError for an unknown node)."""
        reg = self._registry()
        change = reg.patch(uuid, source=actor, **changes)
        await self._commit_now()
        return reg.get(change.node.uuid) or change.node

    async def forget(self, uuid: str) -> bool:
        reg = self._registry()
        node = reg.forget(uuid)
        if node is None:
            return False
        self._stuck.discard(node.uuid)
        if self.bmcs is not None:
            self.bmcs.reenroll()  # a machine file with a bmc: brings the node back
        await self._commit_now()
        return True

    # -- commissioning -------------------------------------------------------------
    async def inventoried(self, uuid: str, inventory: dict[str, Any], *,
                          address: str | None) -> tuple[Node, Commissioning]:
        """A commissioning OS reported the hardware. Returns the node and what the OS
        does next: set the BMC address netboot hands out, wait while netboot checks the
        BMC out of band, or power off (the node is then 'ready')."""
        reg = self._registry()
        node = reg.get(uuid)
        if node is None or node.state != "commissioning":
            # only a node netboot is commissioning may report (and steer its BMC record)
            raise NotCommissioning(f"node {uuid} is {node.state if node else 'unknown'}, not "
                                   "commissioning: boot it into a profile with commission: "
                                   "true first")
        reg.set_inventory(uuid, inventory)
        smbios = inventory.get("smbios") or {}
        ident: dict[str, str | bool | None] = {
            k: smbios.get(k) or None for k in ("serial", "vendor", "product")}
        ident["secure_boot"] = inventory.get("secure_boot")
        change = reg.observe(uuid, mac=None, address=address, source="commission", **ident)
        for nic in inventory.get("nics") or []:
            if nic.get("mac"):
                reg.observe(uuid, mac=nic["mac"], address=None, source="commission")
        if change.created:
            self._publish(change, "commission")
        answer = await self._commission_bmc(uuid, inventory.get("bmc") or None)
        if answer.action == "poweroff":
            self._publish(reg.set_state(uuid, "ready", source="commission", address=address),
                          "commission")
        await self._commit_now()
        return reg.get(uuid) or change.node, answer

    async def _commission_bmc(self, uuid: str, bmc: dict[str, Any] | None) -> Commissioning:
        if self.bmcs is None or self.power is None:
            return Commissioning("poweroff", note="netboot has no BMC control set up")
        settings = self.bmcs.store.server.bmc
        seen = (bmc or {}).get("address") or None
        if seen in (None, "0.0.0.0"):
            if not settings.addresses:
                return Commissioning("poweroff", note="no BMC found in-band")
            seen = None
        wanted = self._bmc_address(uuid, settings.addresses) if settings.addresses else seen
        if wanted is None:
            return Commissioning("poweroff", note="no free BMC address: bmc.addresses is "
                                 "used up")
        if seen != wanted:
            # recorded now, so two nodes commissioning at once are never told the same one
            if self._learn(uuid, wanted) is None:
                return Commissioning("poweroff", note="no BMC credentials to hand out an "
                                     "address with: set bmc.credentials in netboot.yaml")
            return Commissioning("set-bmc", wanted, settings.netmask, settings.gateway)
        cfg = self._learn(uuid, wanted)
        if cfg is None:
            return Commissioning("poweroff", note="BMC found, but no credentials: set "
                                 "bmc.credentials in netboot.yaml")
        status = await self.power.status(uuid, cfg)
        if status.state == "unknown":
            return Commissioning("wait", note=f"BMC at {wanted} not reachable out of band "
                                 f"yet: {status.reason}")
        return Commissioning("poweroff", note=f"BMC at {wanted} answers: power {status.state}")

    def _learn(self, uuid: str, address: str) -> BmcConfig | None:
        assert self.bmcs is not None
        try:
            return self.bmcs.learn(uuid, address)
        except ValueError as exc:  # the site's bmc.credentials cannot log in to it
            log.error("node %s: BMC at %s: %s", uuid, address, exc)
            return None

    def _bmc_address(self, uuid: str, pool: list[str]) -> str | None:
        """This node's address from the pool: the one it has, else the first nobody has."""
        assert self.bmcs is not None
        mine = self.bmcs.registry.bmc(uuid)
        if mine is not None and mine.address in pool:
            return mine.address
        taken = {b.address for u, b in self.bmcs.registry.bmcs().items() if u != uuid}
        return next((a for a in pool if a not in taken), None)

    # -- power ----------------------------------------------------------------------
    async def deploy(self, uuid: str, profile: str, *, actor: str) -> Node:
        """Boot ``profile`` from the network now: assign it, re-arm, next boot network,
        power on (or cycle a node that is on)."""
        reg = self._registry()
        if reg.get(uuid) is None:
            raise KeyError(uuid)
        self._bmc(uuid)  # no BMC: say so before changing anything
        state = await self.power_status(uuid)
        if state.state == "unknown":  # 'on' would do nothing to a running machine
            raise BmcError(f"cannot tell whether node {uuid} is on: {state.reason}",
                           kind="unreachable")
        reg.patch(uuid, assign=profile, rearm=True, source=actor)
        await self._commit_now()
        await self.power_action(uuid, "on" if state.state == "off" else "cycle", "network")
        return reg.get(uuid)  # type: ignore[return-value]

    async def power_action(self, uuid: str, action: str, boot: str | None, *,
                           persistent: bool = False) -> None:
        """Power ``action`` through the node's BMC, after setting its boot device (next
        boot only, or every boot with ``persistent``); BmcError says why not."""
        cfg = self._bmc(uuid)
        assert self.power is not None
        await self.power.act(uuid, cfg, action, boot, persistent=persistent)

    async def power_status(self, uuid: str) -> PowerStatus:
        cfg = self._bmc(uuid)
        assert self.power is not None
        return await self.power.status(uuid, cfg)

    def last_power(self, uuid: str) -> PowerStatus | None:
        return self.power.last(uuid) if self.power is not None else None

    def _bmc(self, uuid: str) -> BmcConfig:
        if self.power is None or self.bmcs is None:
            raise BmcError("BMC control is not set up (no registry)", kind="config")
        cfg = self.bmcs.config_for(uuid)
        if cfg is None:
            raise BmcError(f"node {uuid} has no BMC: give its machine file a bmc: block, "
                           "or let it commission", kind="config")
        return cfg

    # -- stuck --------------------------------------------------------------------
    def stuck(self) -> list[Node]:
        """Nodes deploying or commissioning for longer than stuck_after (cost: those nodes
        only): a node left powered on at the rack shows up here, with its address."""
        if self.registry is None:
            return []
        limit = self._clock() - self.stuck_after
        return [n for state in STUCK_STATES for n in self.registry.in_state(state)
                if n.state_since < limit]

    def is_stuck(self, node: Node) -> bool:
        return node.state in STUCK_STATES and node.state_since < self._clock() - self.stuck_after

    def check_stuck(self) -> list[Node]:
        """Newly stuck nodes get an event and are published once; returns them."""
        fresh = [n for n in self.stuck() if n.uuid not in self._stuck]
        if not fresh or self.registry is None:
            return []
        now = self._clock()
        for n in fresh:
            self._stuck.add(n.uuid)
            self.counters.inc("node_stuck_total")
            self.registry.add_event(n.uuid, "stuck",
                                    f"in {n.state} for {now - n.state_since:.0f}s",
                                    source="netboot")
            self._emit(LifecycleEvent("stuck", n, n, "netboot", now))
        self.queue_commit()
        return fresh

    # -- background -------------------------------------------------------------------
    async def run(self) -> None:
        """Record DHCP first contacts in batches, and look for stuck nodes."""
        await asyncio.gather(self._note_consumer(), self._stuck_loop())

    async def drain(self) -> None:
        """Record every queued first contact now, and commit (shutdown, tests); log the
        new-node refusals not yet in a line."""
        self._apply_notes(None)
        self._refusal_log.flush()
        if self.limiter is not None:
            self.limiter.flush()
        if self.registry is not None:
            with contextlib.suppress(RegistryError):
                await self.registry.commit()

    async def _note_consumer(self) -> None:
        while True:
            first = await self._notes.get()
            self._apply_notes(NOTE_BATCH, first)
            if self.registry is not None:
                try:
                    await self.registry.commit()
                except RegistryError as exc:
                    self._write_failed(exc)

    def _apply_notes(self, limit: int | None, first: tuple[str, str, str] | None = None) -> None:
        n = 0
        while limit is None or n < limit:
            if first is not None:
                item, first = first, None
            else:
                try:
                    item = self._notes.get_nowait()
                except asyncio.QueueEmpty:
                    break
            n += 1
            uuid, mac, profile = item
            self._queued.discard(uuid)
            if self.registry is None or self.registry.get(uuid) is not None:
                continue
            change = self.registry.observe(uuid, mac=mac, address=None, source="dhcp",
                                           profile=profile)
            self._publish(change, "dhcp")

    async def _stuck_loop(self) -> None:
        interval = max(0.2, min(30.0, self.stuck_after / 10))
        while True:
            await asyncio.sleep(interval)
            try:
                self.check_stuck()
            except Exception:
                log.exception("stuck check failed")

    # -- internals --------------------------------------------------------------------
    def _take(self, uuid: str, address: str | None, path: str) -> float | None:
        """None once a new node's tokens are taken, else the seconds to wait (counted
        and logged)."""
        if self.limiter is None:
            return None
        return self.limiter.take(Source.address(address), path, uuid)

    def _registry(self) -> Registry:
        if self.registry is None:
            raise RegistryError(self.problem or "the registry is not open")
        return self.registry

    def _publish(self, change: Change, source: str) -> None:
        if not change.moved:
            return
        node = change.node
        if node.state == "error":
            self.counters.inc("node_failures_total")
        if node.state not in STUCK_STATES:
            self._stuck.discard(node.uuid)
        self._emit(LifecycleEvent(node.state, node, change.old, source, node.state_since))

    def _remote(self, change: Change) -> None:
        """Another instance changed a node (a fleet on PostgreSQL): tell the listeners
        (dashboards' live updates) when its state moved. Counted by that instance, not
        here, so a fleet's metrics add up."""
        node = change.node
        if node.state not in STUCK_STATES:
            self._stuck.discard(node.uuid)
        if change.moved:
            self._emit(LifecycleEvent(node.state, node, change.old,
                                      f"instance {node.instance or '?'}", node.state_since))

    def _emit(self, event: LifecycleEvent) -> None:
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                log.exception("lifecycle listener failed on %s", event.kind)

    def queue_commit(self) -> None:
        """Commit what is pending without waiting; a failure is counted and reported."""
        assert self.registry is not None
        self.registry.commit().add_done_callback(self._committed)

    def _committed(self, fut: asyncio.Future[None]) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            self._write_failed(exc)

    async def _commit_now(self) -> None:
        assert self.registry is not None
        try:
            await self.registry.commit()
        except RegistryError as exc:
            self._write_failed(exc)
            raise

    def _write_failed(self, exc: BaseException) -> None:
        self.counters.inc("registry_write_errors_total")
        where = self.registry.location if self.registry is not None else "the data dir"
        self.problem = f"registry in {where}: {exc}"
        self._write_errors.record(type(exc).__name__, exc, where)
