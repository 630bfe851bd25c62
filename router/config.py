"""The router's one TOML config, read into frozen dataclasses.

The file reads like the pipeline: ``[node]`` receives, ``[deid]`` de-identifies,
``[[destinations]]`` export. Every mistake is reported with its key and line, so
``deid-router check-config`` can list them all at once instead of failing on the first.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import ssl
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Annex E options, by the names the config uses, with their CID 7050 code values.
OPTIONS: dict[str, tuple[str, str]] = {
    "clean-pixel-data": ("113101", "Clean Pixel Data Option"),
    "clean-recognizable-visual-features": ("113102", "Clean Recognizable Visual Features Option"),
    "clean-graphics": ("113103", "Clean Graphics Option"),
    "clean-structured-content": ("113104", "Clean Structured Content Option"),
    "clean-descriptors": ("113105", "Clean Descriptors Option"),
    "retain-longitudinal-full-dates": ("113106", "Retain Longitudinal Temporal Information Full Dates Option"),
    "retain-longitudinal-modified-dates": ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    "retain-patient-characteristics": ("113108", "Retain Patient Characteristics Option"),
    "retain-device-identity": ("113109", "Retain Device Identity Option"),
    "retain-uids": ("113110", "Retain UIDs Option"),
    "retain-safe-private": ("113111", "Retain Safe Private Option"),
    "retain-institution-identity": ("113112", "Retain Institution Identity Option"),
}
BASIC_PROFILE_CODE = ("113100", "Basic Application Confidentiality Profile")

#: Options used when a config does not name any (``options = []`` selects the Basic
#: Profile alone): the set public research archives such as TCIA apply, which keeps
#: what research needs (intervals between dates, age/sex/size, scanner identity, safe
#: private attributes, cleaned descriptions) and removes the rest.
DEFAULT_OPTIONS = frozenset({
    "retain-longitudinal-modified-dates",
    "retain-patient-characteristics",
    "retain-device-identity",
    "retain-safe-private",
    "clean-descriptors",
    "clean-structured-content",
    "clean-graphics",
    "clean-pixel-data",
})

#: Actions a site override may name.
OVERRIDE_ACTIONS = ("keep", "remove", "empty", "dummy", "replace", "pseudonym", "uid")

DEFAULT_SPOOL_DIR = Path("deid-router-spool")
DEFAULT_OUT_DIR = Path("deid-router-out")
SECRET_FILE_NAME = "site-secret"
MAX_ASSOCIATIONS_PER_DESTINATION = 8


class ConfigError(ValueError):
    """A config with one or more mistakes; ``problems`` holds one line per mistake."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class TlsConfig:
    """DICOM TLS (PS3.15 B.1): PEM files; TLS 1.2 or newer only.

    On the node: certificate + private_key are its identity; with ca_certificates, client
    certificates are verified (and required unless require_client_certificate = false).
    Toward a destination: ca_certificates verifies the peer (the system store if absent),
    certificate + private_key authenticate the router, server_name is checked against the
    peer's certificate (default: the destination's host).
    """

    certificate: Path | None = None
    private_key: Path | None = None
    ca_certificates: Path | None = None
    require_client_certificate: bool = True
    server_name: str = ""


@dataclass(frozen=True)
class NodeConfig:
    ae_title: str = "DEID_ROUTER"
    bind: str = "0.0.0.0"
    port: int = 11112
    spool_dir: Path = DEFAULT_SPOOL_DIR
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    #: C-STOREs are answered 0xA700 once the spool holds this many bytes.
    max_spool_bytes: int = 20 * 1024**3
    #: ... or once the file system has less than this free.
    min_free_bytes: int = 512 * 1024**2
    allowed_ae_titles: tuple[str, ...] = ()
    allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    #: Keep delivered instances in the spool's done/ stage instead of deleting them.
    keep_delivered: bool = False
    max_pdu: int = 131072
    tls: TlsConfig | None = None


@dataclass(frozen=True)
class Destination:
    name: str
    type: str = "dicom"  # "dicom" or "folder"
    ae_title: str = ""
    host: str = ""
    port: int = 0
    path: Path | None = None
    calling_ae_title: str = ""  # our AE title toward it; defaults to node.ae_title
    #: Routing filters; empty means every instance.
    from_ae_titles: tuple[str, ...] = ()
    modalities: tuple[str, ...] = ()
    max_attempts: int = 10
    #: Attempts for an instance the destination refused outright (a failure status other
    #: than 0xA7xx Out of Resources, its SOP class not accepted, a file it cannot be sent
    #: from): the answer does not change by waiting, so it reaches the quarantine (and its
    #: reason a PACS administrator) in seconds, not after max_attempts' ~8 minutes.
    refused_attempts: int = 3
    retry_initial_seconds: float = 1.0
    retry_max_seconds: float = 300.0
    idle_timeout_seconds: float = 20.0
    timeout_seconds: float = 30.0
    #: Associations at once toward a DICOM destination (see router.forward: the second
    #: opens only while a backlog waits, and only if the destination takes it at once).
    associations: int = 2
    tls: TlsConfig | None = None


@dataclass(frozen=True)
class Override:
    """A site's rule for one tag, replacing the standard's action for it."""

    action: str
    value: str | None = None


@dataclass(frozen=True)
class SafePrivate:
    """Private elements kept by retain-safe-private: a creator, and optionally one element."""

    creator: str
    group: int | None = None
    element: int | None = None  # the low byte (xx) of the element within the creator's block


@dataclass(frozen=True)
class DeidConfig:
    secret: bytes | None = None
    options: frozenset[str] = DEFAULT_OPTIONS
    pseudonym_prefix: str = "DEID-"
    #: Combined codes (X/Z, X/D, ...): "conservative" keeps the attribute in its dummy
    #: or empty form (valid whatever the attribute's IOD type); "remove" deletes it.
    combined_codes: str = "conservative"
    #: Date shift range, in days before the original date, for modified dates.
    date_shift_min_days: int = 365
    date_shift_max_days: int = 3650
    overrides: dict[int, Override] = field(default_factory=dict)
    safe_private: tuple[SafePrivate, ...] = ()
    #: A site's pixel policy (TOML), layered table by table over rules/pixels.toml.
    pixel_policy: dict[str, Any] | None = None
    #: CSV where the text read off every masked pixel region is kept for review (PHI!).
    text_crosswalk: Path | None = None
    #: Cut person names the header does not hold from kept text (router/names.py).
    find_names: bool = True
    #: Words of the site's text never taken for a name, beside rules/policy.toml's.
    not_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"
    format: str = "auto"  # "auto", "json" or "console"


@dataclass(frozen=True)
class StatusConfig:
    """The HTTP listener for /metrics, the status page and /healthz."""

    enabled: bool = False
    bind: str = "127.0.0.1"
    port: int = 8080


@dataclass(frozen=True)
class AuditConfig:
    """The local SQLite audit store; off without a path. It holds PHI with crosswalk on."""

    path: Path | None = None
    crosswalk: bool = False
    #: Keep the text read off masked pixel regions (PHI; OCR reads each masked box, ~30 ms).
    pixel_text: bool = False


@dataclass(frozen=True)
class Config:
    node: NodeConfig = field(default_factory=NodeConfig)
    deid: DeidConfig = field(default_factory=DeidConfig)
    destinations: tuple[Destination, ...] = ()
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    status: StatusConfig = field(default_factory=StatusConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    source: Path | None = None


def embedded_default() -> Config:
    """The config used with no file: listen on 11112, write to ./deid-router-out."""
    return Config(destinations=(Destination(name="out", type="folder", path=DEFAULT_OUT_DIR),))


def load(path: Path | str) -> Config:
    """Read and validate a config file; raise ConfigError listing every mistake."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from exc
    return parse(text, source=path)


def parse(text: str, source: Path | None = None) -> Config:
    name = str(source) if source else "<config>"
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{name}: {exc}"]) from exc
    reader = _Reader(raw, _KeyLines(text), name, source.parent if source else Path.cwd())
    config = reader.config()
    if reader.problems:
        raise ConfigError(reader.problems)
    return config


def resolve_secret(config: Config) -> tuple[bytes, bool]:
    """The site secret: from the config, else kept in the spool dir (made on first use).

    Returns the secret and whether it was just generated, so the caller can say so once.
    """
    if config.deid.secret is not None:
        return config.deid.secret, False
    path = config.node.spool_dir / SECRET_FILE_NAME
    try:
        return path.read_bytes().strip(), False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_hex(32).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(value + b"\n")
        out.flush()
        os.fsync(out.fileno())
    return value, True


def parse_tag(text: str) -> int:
    """'(0010,0010)', '0010,0010', '00100010' or a keyword -> tag as an int."""
    from pydicom.datadict import tag_for_keyword

    cleaned = text.strip().strip("()").replace(",", "").replace(" ", "")
    if re.fullmatch(r"[0-9A-Fa-f]{8}", cleaned):
        return int(cleaned, 16)
    tag = tag_for_keyword(text.strip())
    if tag is None:
        raise ValueError(f"not a tag or keyword: {text!r}")
    return tag


class _KeyLines:
    """Finds the line of a dotted key in the TOML text, for error messages."""

    def __init__(self, text: str):
        self.lines: dict[tuple[str, ...], int] = {}
        table: tuple[str, ...] = ()
        counts: dict[str, int] = {}
        for number, line in enumerate(text.splitlines(), start=1):
            stripped = line.split("#", 1)[0].strip()
            if m := re.fullmatch(r"\[\[\s*([\w.\-]+)\s*\]\]", stripped):
                index = counts.get(m.group(1), 0)
                counts[m.group(1)] = index + 1
                table = (*m.group(1).split("."), str(index))
                self.lines.setdefault(table, number)
            elif m := re.fullmatch(r"\[\s*([\w.\-\"]+)\s*\]", stripped):
                table = tuple(part.strip('"') for part in m.group(1).split("."))
                self.lines.setdefault(table, number)
            elif m := re.match(r"(\"[^\"]+\"|[\w\-]+)\s*=", stripped):
                self.lines.setdefault((*table, m.group(1).strip('"')), number)

    def of(self, key: tuple[str, ...]) -> int | None:
        while key:
            if key in self.lines:
                return self.lines[key]
            key = key[:-1]
        return None


class _Reader:
    def __init__(self, raw: dict[str, Any], lines: _KeyLines, name: str, base: Path):
        self.raw, self.lines, self.name, self.base = raw, lines, name, base
        self.problems: list[str] = []

    def problem(self, key: tuple[str, ...], message: str) -> None:
        line = self.lines.of(key)
        where = f"{self.name}:{line}" if line else self.name
        self.problems.append(f"{where}: {'.'.join(key)}: {message}")

    def table(self, key: tuple[str, ...], value: Any, known: set[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.problem(key, "must be a table")
            return {}
        for unknown in sorted(set(value) - known):
            self.problem((*key, unknown), f"unknown key (known: {', '.join(sorted(known))})")
        return value

    def get(self, table: dict[str, Any], key: tuple[str, ...], kind: type | tuple[type, ...], default: Any) -> Any:
        if key[-1] not in table:
            return default
        value = table[key[-1]]
        if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            self.problem(key, f"must be {names}, not {type(value).__name__}")
            return default
        return value

    def strings(self, table: dict[str, Any], key: tuple[str, ...]) -> tuple[str, ...]:
        value = self.get(table, key, list, [])
        if not all(isinstance(item, str) for item in value):
            self.problem(key, "must be a list of strings")
            return ()
        return tuple(value)

    def path(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.base / path

    def config(self) -> Config:
        top = self.table((), self.raw, {"node", "deid", "destinations", "logging", "status", "audit"})
        node = self.node(top.get("node", {}))
        deid = self.deid(top.get("deid", {}))
        destinations = self.destinations(top.get("destinations", []), node)
        logging = self.logging(top.get("logging", {}))
        source = None if self.name == "<config>" else Path(self.name)
        status = self.status(top.get("status", {}))
        if status.enabled and status.port and status.port == node.port:
            self.problem(("status", "port"), f"is the DICOM port ({node.port}): choose another")
        return Config(node=node, deid=deid, destinations=destinations, logging=logging, status=status,
                      audit=self.audit(top.get("audit", {})), source=source)

    def status(self, value: Any) -> StatusConfig:
        d = StatusConfig()
        t = self.table(("status",), value, {"enabled", "bind", "port"})
        port = self.get(t, ("status", "port"), int, d.port)
        if not 0 <= port <= 65535:
            self.problem(("status", "port"), "must be 0..65535")
        bind = self.get(t, ("status", "bind"), str, d.bind)
        try:
            ipaddress.ip_address(bind)
        except ValueError:
            self.problem(("status", "bind"), f"must be an IP address (127.0.0.1, 0.0.0.0, ::1), not {bind!r}")
        return StatusConfig(enabled=self.get(t, ("status", "enabled"), bool, d.enabled), bind=bind, port=port)

    def audit(self, value: Any) -> AuditConfig:
        t = self.table(("audit",), value, {"path", "crosswalk", "pixel_text"})
        path = self.get(t, ("audit", "path"), str, None)
        crosswalk = self.get(t, ("audit", "crosswalk"), bool, False)
        pixel_text = self.get(t, ("audit", "pixel_text"), bool, False)
        for name, on in (("crosswalk", crosswalk), ("pixel_text", pixel_text)):
            if on and not path:
                self.problem(("audit", name), f"needs audit.path (the {name} is kept in the audit store)")
        return AuditConfig(path=self.path(path) if path else None, crosswalk=crosswalk, pixel_text=pixel_text)

    def node(self, value: Any) -> NodeConfig:
        d = NodeConfig()
        t = self.table(("node",), value, {f for f in NodeConfig.__dataclass_fields__})
        k = lambda name: ("node", name)  # noqa: E731
        ae = self.get(t, k("ae_title"), str, d.ae_title)
        self.check_ae(k("ae_title"), ae)
        port = self.get(t, k("port"), int, d.port)
        if not 0 <= port <= 65535:
            self.problem(k("port"), "must be 0..65535")
        workers = self.get(t, k("workers"), int, d.workers)
        if workers < 1:
            self.problem(k("workers"), "must be at least 1")
        networks = []
        for text in self.strings(t, k("allowed_networks")):
            try:
                networks.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                self.problem(k("allowed_networks"), f"not an IP network: {text!r}")
        titles = self.strings(t, k("allowed_ae_titles"))
        for title in titles:
            self.check_ae(k("allowed_ae_titles"), title)
        spool = self.get(t, k("spool_dir"), str, None)
        max_pdu = self.get(t, k("max_pdu"), int, d.max_pdu)
        if max_pdu and not 4096 <= max_pdu <= 2**32 - 1:
            self.problem(k("max_pdu"), "must be 0 (unlimited) or 4096..4294967295")
        return NodeConfig(
            ae_title=ae,
            bind=self.get(t, k("bind"), str, d.bind),
            port=port,
            spool_dir=self.path(spool) if spool else d.spool_dir,
            workers=workers,
            max_spool_bytes=self.get(t, k("max_spool_bytes"), int, d.max_spool_bytes),
            min_free_bytes=self.get(t, k("min_free_bytes"), int, d.min_free_bytes),
            allowed_ae_titles=titles,
            allowed_networks=tuple(networks),
            keep_delivered=self.get(t, k("keep_delivered"), bool, d.keep_delivered),
            max_pdu=max_pdu,
            tls=self.tls(k("tls"), t["tls"], server=True) if "tls" in t else None,
        )

    def check_ae(self, key: tuple[str, ...], title: str) -> None:
        if not 1 <= len(title.strip()) <= 16 or "\\" in title or not title.isprintable():
            self.problem(key, f"not a valid AE title (1-16 printable characters, no backslash): {title!r}")

    def deid(self, value: Any) -> DeidConfig:
        d = DeidConfig()
        known = {"secret", "secret_file", "options", "pseudonym_prefix", "combined_codes",
                 "date_shift_min_days", "date_shift_max_days", "overrides", "safe_private", "pixel_policy",
                 "text_crosswalk", "find_names", "not_names"}
        t = self.table(("deid",), value, known)
        k = lambda name: ("deid", name)  # noqa: E731
        secret = None
        if "secret" in t and "secret_file" in t:
            self.problem(k("secret_file"), "give either secret or secret_file, not both")
        if (text := self.get(t, k("secret"), str, None)) is not None:
            if len(text) < 8:
                self.problem(k("secret"), "too short: use at least 8 characters (better 32 random ones)")
            secret = text.encode()
        if (file := self.get(t, k("secret_file"), str, None)) is not None:
            try:
                secret = self.path(file).read_bytes().strip()
            except OSError as exc:
                self.problem(k("secret_file"), f"cannot read: {exc.strerror}")
            else:
                if len(secret) < 8:
                    self.problem(k("secret_file"), "the secret in it is shorter than 8 characters")
        options = self.strings(t, k("options")) if "options" in t else tuple(d.options)
        for option in options:
            if option not in OPTIONS:
                self.problem(k("options"), f"unknown option {option!r} (known: {', '.join(OPTIONS)})")
        if {"retain-longitudinal-full-dates", "retain-longitudinal-modified-dates"} <= set(options):
            self.problem(k("options"), "retain-longitudinal-full-dates and -modified-dates exclude each other")
        combined = self.get(t, k("combined_codes"), str, d.combined_codes)
        if combined not in ("conservative", "remove"):
            self.problem(k("combined_codes"), "must be 'conservative' or 'remove'")
        low = self.get(t, k("date_shift_min_days"), int, d.date_shift_min_days)
        high = self.get(t, k("date_shift_max_days"), int, d.date_shift_max_days)
        if not 1 <= low <= high <= 36500:
            self.problem(k("date_shift_max_days"), "need 1 <= date_shift_min_days <= date_shift_max_days <= 36500")
        return DeidConfig(
            secret=secret,
            options=frozenset(o for o in options if o in OPTIONS),
            pseudonym_prefix=self.get(t, k("pseudonym_prefix"), str, d.pseudonym_prefix),
            combined_codes=combined,
            date_shift_min_days=low,
            date_shift_max_days=high,
            overrides=self.overrides(t.get("overrides", {})),
            safe_private=self.safe_private(t.get("safe_private", [])),
            pixel_policy=self.pixel_policy(self.get(t, k("pixel_policy"), str, None)),
            text_crosswalk=self.path(crosswalk) if (crosswalk := self.get(t, k("text_crosswalk"), str, None)) else None,
            find_names=self.get(t, k("find_names"), bool, d.find_names),
            not_names=self.strings(t, k("not_names")) if "not_names" in t else d.not_names,
        )

    def pixel_policy(self, file: str | None) -> dict[str, Any] | None:
        if file is None:
            return None
        try:
            return tomllib.loads(self.path(file).read_text(encoding="utf-8"))
        except OSError as exc:
            self.problem(("deid", "pixel_policy"), f"cannot read: {exc.strerror}")
        except tomllib.TOMLDecodeError as exc:
            self.problem(("deid", "pixel_policy"), f"not valid TOML: {exc}")
        return None

    def overrides(self, value: Any) -> dict[int, Override]:
        """``[deid.overrides]`` maps a tag or keyword to an action or {action, value}."""
        result: dict[int, Override] = {}
        if not isinstance(value, dict):
            self.problem(("deid", "overrides"), "must be a table of tag = action")
            return result
        for name, spec in value.items():
            key = ("deid", "overrides", name)
            try:
                tag = parse_tag(name)
            except ValueError as exc:
                self.problem(key, str(exc))
                continue
            if isinstance(spec, str):
                spec = {"action": spec}
            if not isinstance(spec, dict) or spec.get("action") not in OVERRIDE_ACTIONS:
                self.problem(key, f"action must be one of {', '.join(OVERRIDE_ACTIONS)}")
                continue
            if (spec["action"] == "replace") != ("value" in spec) or set(spec) - {"action", "value"}:
                self.problem(key, "'replace' takes a value (and only 'replace' does)")
                continue
            result[tag] = Override(spec["action"], spec.get("value"))
        return result

    def safe_private(self, value: Any) -> tuple[SafePrivate, ...]:
        """``[[deid.safe_private]]`` entries: creator, and optionally group and element."""
        result = []
        if not isinstance(value, list):
            self.problem(("deid", "safe_private"), "must be an array of tables ([[deid.safe_private]])")
            return ()
        for index, entry in enumerate(value):
            key = ("deid", "safe_private", str(index))
            t = self.table(key, entry, {"creator", "group", "element"})
            creator = self.get(t, (*key, "creator"), str, "")
            if not creator:
                self.problem(key, "needs a creator")
                continue
            group = self.get(t, (*key, "group"), int, None)
            element = self.get(t, (*key, "element"), int, None)
            if group is not None and not group % 2:
                self.problem((*key, "group"), "a private group is odd")
            if element is not None and not 0 <= element <= 0xFF:
                self.problem((*key, "element"), "the element within a private block is 0x00..0xFF")
            result.append(SafePrivate(creator.strip(), group, element))
        return tuple(result)

    def destinations(self, value: Any, node: NodeConfig) -> tuple[Destination, ...]:
        if not isinstance(value, list):
            self.problem(("destinations",), "must be an array of tables ([[destinations]])")
            return ()
        result = []
        names: set[str] = set()
        for index, entry in enumerate(value):
            k = lambda name: ("destinations", str(index), name)  # noqa: E731,B023
            t = self.table(("destinations", str(index)), entry, set(Destination.__dataclass_fields__))
            d = Destination(name="")
            name = self.get(t, k("name"), str, "")
            if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
                self.problem(k("name"), "needs a name of letters, digits, '_', '.', '-'")
            elif name in names:
                self.problem(k("name"), f"duplicate destination name {name!r}")
            elif name in ("deidentify", "unrouted"):
                self.problem(k("name"), f"{name!r} is reserved for a quarantine folder of the spool")
            names.add(name)
            kind = self.get(t, k("type"), str, d.type)
            path = None
            if kind == "dicom":
                for required in ("ae_title", "host", "port"):
                    if required not in t:
                        self.problem(k(required), "required for a dicom destination")
                self.check_ae(k("ae_title"), self.get(t, k("ae_title"), str, "X"))
            elif kind == "folder":
                if "path" not in t:
                    self.problem(k("path"), "required for a folder destination")
                path = self.path(self.get(t, k("path"), str, "."))
            else:
                self.problem(k("type"), "must be 'dicom' or 'folder'")
            result.append(Destination(
                name=name,
                type=kind,
                ae_title=self.get(t, k("ae_title"), str, ""),
                host=self.get(t, k("host"), str, ""),
                port=self.get(t, k("port"), int, 0),
                path=path,
                calling_ae_title=self.get(t, k("calling_ae_title"), str, node.ae_title),
                from_ae_titles=self.strings(t, k("from_ae_titles")),
                modalities=tuple(m.upper() for m in self.strings(t, k("modalities"))),
                max_attempts=self.attempts(k("max_attempts"), self.get(t, k("max_attempts"), int, d.max_attempts)),
                refused_attempts=self.attempts(k("refused_attempts"),
                                               self.get(t, k("refused_attempts"), int, d.refused_attempts)),
                retry_initial_seconds=float(self.get(t, k("retry_initial_seconds"), (int, float), d.retry_initial_seconds)),
                retry_max_seconds=float(self.get(t, k("retry_max_seconds"), (int, float), d.retry_max_seconds)),
                idle_timeout_seconds=float(self.get(t, k("idle_timeout_seconds"), (int, float), d.idle_timeout_seconds)),
                timeout_seconds=float(self.get(t, k("timeout_seconds"), (int, float), d.timeout_seconds)),
                associations=self.associations(k("associations"), self.get(t, k("associations"), int, d.associations)),
                tls=self.tls(k("tls"), t["tls"], server=False) if "tls" in t else None,
            ))
        return tuple(result)

    def attempts(self, key: tuple[str, ...], value: int) -> int:
        if value < 1:
            self.problem(key, "must be 1 or more")
            return 1
        return value

    def associations(self, key: tuple[str, ...], value: int) -> int:
        if not 1 <= value <= MAX_ASSOCIATIONS_PER_DESTINATION:
            self.problem(key, f"must be 1 to {MAX_ASSOCIATIONS_PER_DESTINATION}")
            return 1
        return value

    def tls(self, key: tuple[str, ...], value: Any, server: bool) -> TlsConfig | None:
        known = {"certificate", "private_key", "ca_certificates"} | (
            {"require_client_certificate"} if server else {"server_name"})
        t = self.table(key, value, known)
        files = {}
        for name in ("certificate", "private_key", "ca_certificates"):
            text = self.get(t, (*key, name), str, None)
            if text is not None:
                files[name] = self.path(text)
                if not files[name].is_file():
                    self.problem((*key, name), f"no such file: {files[name]}")
        if server and not {"certificate", "private_key"} <= set(files):
            self.problem(key, "the node needs certificate and private_key for TLS")
        if ("certificate" in files) != ("private_key" in files):
            self.problem(key, "certificate and private_key go together")
        require = self.get(t, (*key, "require_client_certificate"), bool, True)
        if server and t.get("require_client_certificate") is True and "ca_certificates" not in files:
            self.problem((*key, "require_client_certificate"), "needs ca_certificates (to verify client certificates)")
        self.check_tls_files(key, files)
        return TlsConfig(certificate=files.get("certificate"), private_key=files.get("private_key"),
                         ca_certificates=files.get("ca_certificates"), require_client_certificate=require,
                         server_name=self.get(t, (*key, "server_name"), str, ""))

    def check_tls_files(self, key: tuple[str, ...], files: dict[str, Path]) -> None:
        """Load the PEM files as the node will, so a bad key or certificate is a config error."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if files.get("certificate") and files.get("private_key") and all(
                files[n].is_file() for n in ("certificate", "private_key")):
            try:
                context.load_cert_chain(str(files["certificate"]), str(files["private_key"]), password=b"")
            except (ssl.SSLError, OSError) as exc:
                self.problem((*key, "certificate"), f"cannot use it with private_key: {_ssl_reason(exc)}")
        if files.get("ca_certificates") and files["ca_certificates"].is_file():
            try:
                context.load_verify_locations(str(files["ca_certificates"]))
            except (ssl.SSLError, OSError) as exc:
                self.problem((*key, "ca_certificates"), f"no usable PEM certificate: {_ssl_reason(exc)}")

    def logging(self, value: Any) -> LoggingConfig:
        t = self.table(("logging",), value, {"level", "format"})
        level = self.get(t, ("logging", "level"), str, "info").lower()
        if level not in ("debug", "info", "warning", "error"):
            self.problem(("logging", "level"), "must be debug, info, warning or error")
        fmt = self.get(t, ("logging", "format"), str, "auto")
        if fmt not in ("auto", "json", "console"):
            self.problem(("logging", "format"), "must be auto, json or console")
        return LoggingConfig(level=level, format=fmt)


def _ssl_reason(exc: Exception) -> str:
    """OpenSSL's reason code (KEY_VALUES_MISMATCH...), else what kind of failure it was."""
    if isinstance(exc, ssl.SSLError):
        return exc.reason or "not a PEM certificate and its unencrypted private key"
    return getattr(exc, "strerror", None) or type(exc).__name__
