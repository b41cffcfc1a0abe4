"""Which BMC each node has, and its credentials, sealed at rest.

A node's BMC comes from its machine file (``bmc:``), from commissioning (the OS
reads the BMC's LAN settings in-band, or sets the address netboot hands out) or
from an admin through the API. The registry keeps one record per node with the
password sealed by :class:`~netboot.util.secretbox.SecretBox` under the server
secret; a machine file's BMC is copied there ("enrolled") so every instance and
every restart sees the same thing. The newest source wins: commissioning and the
API over a machine file, a changed machine file over an older copy of itself.

Passwords leave this module only inside a :class:`~netboot.power.bmc.BmcConfig`,
whose repr hides them, on their way to a driver.
"""

from __future__ import annotations

import logging
from typing import Any

from ..config import BmcCredentials, ConfigStore, MachineBmc
from ..power.bmc import BmcConfig
from ..storage.registry import BmcRecord, Registry
from ..util.secretbox import SecretBox, SecretError

log = logging.getLogger("netboot.bmc")


class Bmcs:
    def __init__(self, registry: Registry, store: ConfigStore, box: SecretBox):
        self.registry = registry
        self.store = store
        self.box = box
        self._enrolled: tuple[int, int] = (-1, -1)  # (config generation, registry loads)

    def reenroll(self) -> None:
        """Enroll machine files again at the next round (a node was forgotten)."""
        self._enrolled = (-1, -1)

    def __repr__(self) -> str:
        return f"Bmcs({len(self.registry.bmcs())} nodes)"

    # -- reading ---------------------------------------------------------------------
    def config_for(self, uuid: str) -> BmcConfig | None:
        """How to reach this node's BMC, password included; None when it has none (or its
        password does not open with this server's secret: logged)."""
        rec = self.registry.bmc(uuid)
        return self._config(uuid, rec) if rec is not None else None

    def targets(self) -> dict[str, BmcConfig]:
        """Every node with a usable BMC (the poller asks this each round)."""
        out = {}
        for uuid, rec in self.registry.bmcs().items():
            cfg = self._config(uuid, rec)
            if cfg is not None:
                out[uuid] = cfg
        return out

    def describe(self, uuid: str) -> dict[str, Any] | None:
        """The BMC as the API shows it: never the password."""
        rec = self.registry.bmc(uuid)
        if rec is None:
            return None
        return {"driver": rec.driver, "address": rec.address, "port": rec.port,
                "username": rec.username, "system": rec.system, "source": rec.source,
                "updated": rec.updated, "has_password": rec.secret is not None}

    # -- writing (the caller commits) ---------------------------------------------------
    def enroll(self) -> int:
        """Copy machine files' BMCs into the registry (new or changed ones); a machine
        file with ``uuid`` and ``bmc`` makes its node known, so it can be powered on
        before it ever booted. Returns how many records changed."""
        snap = self.store.snapshot
        # again after a config change, or after the registry reloaded its index
        mark = (snap.generation, self.registry.loads)
        if mark == self._enrolled:
            return 0
        changed = 0
        failed = False
        for machine in snap.machine_files:
            if machine.bmc is None or machine.uuid is None:
                continue
            uuid = machine.uuid
            try:
                password = machine.bmc.secret(self.store.server.machines_dir)
            except OSError as exc:
                log.error("machine %s: bmc password_file: %s", machine.hostname or uuid, exc)
                failed = True
                continue
            rec = self.registry.bmc(uuid)
            if rec is not None and rec.source != "file":
                continue  # commissioning or an admin set it since: newer than the file
            if self.registry.get(uuid) is None:
                self.registry.observe(uuid, mac=machine.all_macs[0] if machine.all_macs
                                      else None, address=None, source="config",
                                      hostname=machine.hostname)
            new = self._record(uuid, machine.bmc, machine.bmc.address, password, "file")
            try:
                self._check(new, password)
            except ValueError as exc:
                log.error("machine %s: %s", machine.hostname or uuid, exc)
                continue
            if rec is None or _differs(rec, new, self._password(uuid, rec), password):
                self.registry.set_bmc(uuid, new)
                changed += 1
        if not failed:  # an unreadable password_file is tried again next round
            self._enrolled = mark
        return changed

    def learn(self, uuid: str, address: str, *, source: str = "commissioning",
              credentials: BmcCredentials | None = None) -> BmcConfig | None:
        """The node's BMC is at ``address``: log in with ``credentials``, else the ones it
        has, else the site's ``bmc.credentials``. None when no credentials are known."""
        old = self.registry.bmc(uuid)
        creds = credentials
        password: str | None = None
        if creds is not None:
            password = creds.secret()
        elif old is not None:
            password = self._password(uuid, old)
            creds = BmcCredentials(driver=old.driver, port=old.port,  # type: ignore[arg-type]
                                   username=old.username, system=old.system,
                                   verify_tls=old.verify_tls)
        else:
            creds = self.store.server.bmc.credentials
            if creds is None:
                return None
            password = creds.secret()
        if password is None:
            return None
        record = self._record(uuid, creds, address, password, source)
        self._check(record, password)  # ValueError: it could never log in
        self.registry.set_bmc(uuid, record)
        return self.config_for(uuid)

    # -- internals ---------------------------------------------------------------------
    def _record(self, uuid: str, creds: BmcCredentials, address: str, password: str,
                source: str) -> BmcRecord:
        return BmcRecord(creds.driver, address, creds.port, creds.username,
                         self.box.seal(password, uuid) if password else None, creds.system,
                         source, verify_tls=creds.verify_tls)

    @staticmethod
    def _check(rec: BmcRecord, password: str) -> None:
        BmcConfig(driver=rec.driver, address=rec.address,  # type: ignore[arg-type]
                  username=rec.username, password=password, port=rec.port, system=rec.system,
                  verify_tls=rec.verify_tls)

    def _password(self, uuid: str, rec: BmcRecord) -> str | None:
        if rec.secret is None:
            return ""
        try:
            return self.box.open(rec.secret, uuid)
        except SecretError as exc:
            log.error("node %s: BMC password: %s", uuid, exc)
            return None

    def _config(self, uuid: str, rec: BmcRecord) -> BmcConfig | None:
        password = self._password(uuid, rec)
        if password is None:
            return None
        try:
            return BmcConfig(driver=rec.driver, address=rec.address,  # type: ignore[arg-type]
                             username=rec.username, password=password, port=rec.port,
                             system=rec.system, verify_tls=rec.verify_tls)
        except ValueError as exc:
            log.error("node %s: BMC %s: %s", uuid, rec.address, exc)
            return None


def _differs(rec: BmcRecord, new: BmcRecord, old_password: str | None, password: str) -> bool:
    return ((rec.driver, rec.address, rec.port, rec.username, rec.system, rec.verify_tls)
            != (new.driver, new.address, new.port, new.username, new.system, new.verify_tls)
            or old_password != password)


__all__ = ["Bmcs", "MachineBmc"]
