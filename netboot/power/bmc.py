"""Where a BMC is and how to log in to it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal
from urllib.parse import urlsplit

Driver = Literal["ipmi", "redfish"]
DRIVERS: tuple[str, ...] = ("ipmi", "redfish")
IPMI_PORT = 623
IPMI_PASSWORD_MAX = 20


@dataclass(frozen=True, kw_only=True)
class BmcConfig:
    """One BMC. Keyword-only; validated on construction (ValueError).

    `address` is a host name or IP address. For Redfish it may also be a URL
    (`https://bmc.example`, `http://127.0.0.1:8000`); a bare host means https.
    `port` None means the protocol's default (623 for IPMI, the URL's port or
    443 for Redfish). `system` is the Redfish system id (`1`) or path
    (`/redfish/v1/Systems/1`); None means the first system the BMC lists
    (in sorted order, so the same one every time).
    IPMI ignores `system` and `verify_tls`.

    The password is kept out of repr() and str(); `dataclasses.asdict()` still
    returns it, so never log that.
    """

    driver: Driver
    address: str
    username: str
    password: str = field(repr=False)
    port: int | None = None
    system: str | None = None
    verify_tls: bool = False

    def __post_init__(self) -> None:
        if self.driver not in DRIVERS:
            raise ValueError(f"bmc driver must be one of {', '.join(DRIVERS)}, "
                             f"not {self.driver!r}")
        if not isinstance(self.address, str) or not self.address.strip():
            raise ValueError("bmc address must be a non-empty host name, IP address or URL")
        if "://" in self.address:
            if self.driver != "redfish":
                raise ValueError("bmc address: a URL is only for the redfish driver; "
                                 "give ipmi a host name or IP address")
            url = urlsplit(self.address)
            if url.scheme not in ("http", "https") or not url.hostname:
                raise ValueError("bmc address: a redfish URL must be http(s)://host[:port]")
            if url.username or url.password:
                raise ValueError("bmc address: put the credentials in username and "
                                 "password, not in the URL")
        if self.port is not None and (
                isinstance(self.port, bool) or not isinstance(self.port, int)
                or not 0 < self.port < 65536):
            raise ValueError(f"bmc port must be an integer from 1 to 65535, not {self.port!r}")
        if not isinstance(self.username, str):
            raise ValueError("bmc username must be a string")
        if not isinstance(self.password, str):
            raise ValueError("bmc password must be a string")  # never echo the value
        if self.driver == "ipmi" and len(self.password.encode()) > IPMI_PASSWORD_MAX:
            # RMCP+ has room for 20 bytes; a longer one can never log in.
            raise ValueError(f"bmc password: IPMI passwords are at most {IPMI_PASSWORD_MAX} "
                             "bytes")
        if self.system is not None and (not isinstance(self.system, str)
                                        or not self.system.strip()):
            raise ValueError("bmc system must be a non-empty Redfish system id or path")
        if not isinstance(self.verify_tls, bool):
            raise ValueError("bmc verify_tls must be true or false")

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any]) -> BmcConfig:
        """Build from a mapping (a machine file's `bmc:`), with clear errors.

        Raises ValueError naming the missing or unknown keys; values are never
        echoed for `password`.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"bmc must be a mapping, not {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in d if k not in known)
        if unknown:
            raise ValueError(f"bmc: unknown key(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
        missing = [k for k in ("driver", "address", "username", "password") if k not in d]
        if missing:
            raise ValueError(f"bmc: missing key(s) {', '.join(missing)}")
        return cls(**dict(d))

    @property
    def endpoint(self) -> str:
        """Where the BMC is, for messages and logs: `ipmi://host:623`, a Redfish URL."""
        if self.driver == "ipmi":
            return f"ipmi://{_host(self.address)}:{self.port or IPMI_PORT}"
        return self.base_url

    @property
    def base_url(self) -> str:
        """The Redfish service URL without the /redfish/v1 root."""
        if "://" in self.address:
            url = urlsplit(self.address)
            scheme, host, port = url.scheme, url.hostname or "", url.port
        else:
            scheme, host, port = "https", self.address, None
        port = self.port or port
        return f"{scheme}://{_host(host)}" + (f":{port}" if port else "")


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
