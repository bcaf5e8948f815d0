"""What libvirt runs: ``hooks/qemu`` execs ``python3 -I -S`` on ``main`` with DOMAIN OP SUB X,
the domain XML on stdin. While ``hvcpolicy start`` drives a start, it runs ``started`` itself on
the sh pre-filter's call (``serve``, see startlock.py): the same code, in a warm interpreter.

libvirt runs the hook synchronously with the domain locked, so every stage imports only what it
needs (no argparse, yaml, jsonschema, asyncio or libvirt on ``prepare``/``migrate``/``restore``),
never calls libvirt, bounds every QMP wait, and leaves no child holding its stdout/stderr.

Configuration comes from a file, not the environment (libvirt passes only PATH, HOME, LC_ALL):
``/etc/hvcpolicy/hook.conf``, or for a non-root (``qemu:///session``) daemon
``~/.config/hvcpolicy/hook.conf`` when that exists. ``key = value`` lines::

    policy_dir = /etc/hvcpolicy/policies
    host_snapshot = /var/lib/hvcpolicy/host.json
    cache_dir = /var/cache/hvcpolicy
    qmp_timeout = 5
    audit_file =                # optional: also append audit lines here (syslog always)
    counters_dir =              # decision totals; default: counters/ beside host_snapshot

Stages (SPEC.md section 7): ``prepare`` refuses a policy this host's snapshot cannot satisfy;
``started`` acts on the runstate (prelaunch: apply, then a detached child records
``<hvc:applied>`` and, with ``<hvc:resume after="apply"/>``, resumes; inmigrate: clear what the
guest never carried; paused: verify; running: verify, then ``enforcement.already-running``);
``migrate``/``restore`` refuse a host that cannot take the guest, printing nothing on stdout;
``reconnect`` verifies and logs and never fails. Everything else exits 0 at once.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # run as a file under -I -S: put the package's directory on sys.path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hvcpolicy.errors import HvcError, InvalidInput, Refused, Unavailable, bounded

TYPE_CHECKING = False  # typing costs more than the interpreter's start-up: checker-only names
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import IO, Any

    from hvcpolicy.domainxml import Domain, DomainPolicy
    from hvcpolicy.policy import Policy
    from hvcpolicy.snapshot import Snapshot

SYSTEM_CONF = "/etc/hvcpolicy/hook.conf"
USER_CONF = ".config/hvcpolicy/hook.conf"  # under a session daemon user's home
DEFAULTS = {
    "policy_dir": "/etc/hvcpolicy/policies",
    "host_snapshot": "/var/lib/hvcpolicy/host.json",
    "cache_dir": "/var/cache/hvcpolicy",
    "qmp_timeout": "5",
    "audit_file": "",
    "run_dir": "/run/hvcpolicy",
    "counters_dir": "",
}
MAX_CONF = 64 << 10
STAGES_HANDLED = ("prepare", "started", "migrate", "restore", "reconnect")


class Config:
    def __init__(self, values: Mapping[str, str], path: str) -> None:
        self.path = path
        self.policy_dir = values["policy_dir"]
        self.host_snapshot = values["host_snapshot"]
        self.cache_dir = values["cache_dir"]
        self.audit_file = values["audit_file"] or None
        self.run_dir = values["run_dir"]
        self.counters_dir = values["counters_dir"] or os.path.join(
            os.path.dirname(os.path.abspath(self.host_snapshot)), "counters"
        )  # counters.default_dir, without importing it before a decision is logged
        try:
            self.qmp_timeout = float(values["qmp_timeout"])
        except ValueError:
            raise InvalidInput("qmp_timeout: not a number of seconds", path) from None
        if not 0 < self.qmp_timeout <= 300:
            raise InvalidInput("qmp_timeout: must be in (0, 300] seconds", path)


def config_path(uid: int | None = None) -> str:
    """The config this daemon's hook reads: the system one, or a session user's own."""
    uid = os.getuid() if uid is None else uid
    if uid != 0:
        import pwd

        try:
            home = pwd.getpwuid(uid).pw_dir
        except KeyError:
            return SYSTEM_CONF
        candidate = os.path.join(home, USER_CONF)
        if os.path.exists(candidate):
            return candidate
    return SYSTEM_CONF


def parse_config(text: str, path: str) -> dict[str, str]:
    values = dict(DEFAULTS)
    for number, raw in enumerate(text.splitlines(), 1):
        content = raw.split("#", 1)[0].strip()
        if not content:
            continue
        key, sep, value = content.partition("=")
        key = key.strip()
        if not sep or key not in DEFAULTS:
            raise InvalidInput(
                f"line {number}: expected one of {', '.join(DEFAULTS)} = VALUE", path
            )
        values[key] = value.strip()
    return values


def load_config(path: str | None = None) -> Config:
    """Read the hook config; a file others could have written is not trusted."""
    path = path or config_path()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return Config(DEFAULTS, path)
    except OSError as err:
        raise Unavailable(f"{path}: cannot read: {err.strerror}") from None
    try:
        st = os.fstat(fd)
        if st.st_uid not in (0, os.getuid()) or st.st_mode & 0o022:
            raise InvalidInput(
                "not trusted: must be owned by root (or this daemon's user) and writable by "
                "no one else",
                path,
            )
        data = os.read(fd, MAX_CONF + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_CONF:
        raise InvalidInput(f"larger than {MAX_CONF} bytes", path)
    return Config(parse_config(data.decode("utf-8", "replace"), path), path)


# --- the stage context ------------------------------------------------------------------------


class Hook:
    """One hook run: the stage, the domain, the config, and the audit fields so far."""

    def __init__(self, argv: list[str], xml: bytes, conf: Config) -> None:
        self.argv = argv
        self.stage = argv[1]
        self.xml = xml
        self.conf = conf
        self.audit: dict[str, str] = {
            "domain": argv[0],
            "uuid": "-",
            "stage": self.stage,  # started: refined to started/RUNSTATE
            "policy": "-",
        }
        self._domain: Domain | None = None
        self.served = False  # run inside `hvcpolicy start` (serve): never fork from there

    @property
    def domain(self) -> Domain:
        if self._domain is None:
            from hvcpolicy.domainxml import parse_domain

            self._domain = parse_domain(self.xml, f"domain {self.argv[0]!r} ({self.stage} XML)")
            self.audit["uuid"] = self._domain.uuid or "-"
        return self._domain

    def policy(self) -> Policy | None:
        """The merged policy for this domain; None when hvcpolicy leaves the domain alone."""
        dom = self.domain
        if dom.meta is None:
            if not has_policy(self.conf.policy_dir, "default"):
                return None
            operator = load_named_policy("default", self.conf)
            self.audit["policy"] = "default"
            return operator
        operator = load_named_policy(dom.meta.ref, self.conf)
        from hvcpolicy.merge import merge

        merged = merge(operator, dom.meta, f"domain {dom.name!r} <hvc:policy>")
        self.audit["policy"] = dom.meta.ref
        return merged

    def snapshot(self) -> Snapshot:
        from hvcpolicy.snapshot import load_snapshot

        path = self.conf.host_snapshot
        if not os.path.exists(path):
            raise Unavailable(
                f"{path}: no host snapshot; run `hvcpolicy host probe -o {path}` on this host"
            )
        return load_snapshot(path)

    def log(self, outcome: str, warning: bool = False, **fields: str) -> None:
        from hvcpolicy import audit, counters

        audit.record({**self.audit, "outcome": outcome, **fields}, self.conf.audit_file, warning)
        counters.count(self.conf.counters_dir, self.audit["stage"], outcome)


def has_policy(directory: str, name: str) -> bool:
    return any(
        os.path.isfile(os.path.join(directory, name + ext)) for ext in (".yaml", ".yml", ".json")
    )


def load_named_policy(ref: str, conf: Config) -> Policy:
    """A policy by name, from the validated cache when it is current; else parse and validate
    (which needs the site packages: yaml, jsonschema) and refresh the cache."""
    from hvcpolicy import policycache

    cached = policycache.load_cached(ref, conf.policy_dir, conf.cache_dir)
    if cached is not None:
        return cached
    _enable_site()
    from hvcpolicy.policy import load_policy

    try:
        policy = load_policy(ref, conf.policy_dir)
    except ImportError as err:
        raise Unavailable(
            f"policy {ref!r}: not in the cache {conf.cache_dir} and this Python cannot validate "
            f"policies ({err}); run `hvcpolicy install-hook` to refresh the cache"
        ) from None
    import contextlib

    with contextlib.suppress(OSError):  # a cache we cannot write: validate again next time
        policycache.store(policy, conf.policy_dir, conf.cache_dir)
    return policy


_site_enabled = False


def _enable_site() -> None:
    """The slow path: site-packages (yaml, jsonschema) for a policy the cache does not hold.
    ``hvcpolicy`` itself is already imported, so it stays this package."""
    global _site_enabled
    if not _site_enabled:
        import site

        site.main()
        _site_enabled = True


# --- stages -----------------------------------------------------------------------------------


def stage_prepare(hook: Hook) -> int:
    policy = hook.policy()
    if policy is None:
        return 0
    target = check_host(policy, hook.snapshot(), f"domain {hook.domain.name!r}")
    hook.log("allowed", after=_regs(target))
    return 0


def check_host(policy: Policy, snap: Snapshot, who: str) -> dict[int, int]:
    """The prepare check, before QEMU exists: can this host run the policy? -> what a guest
    started here is left with. Shared by the hook's prepare stage and ``hvcpolicy start``."""
    from hvcpolicy.planner import plan_start

    plan = plan_start(policy, snap.registers)
    if not plan.ok:
        raise Refused(
            f"{who} cannot start on this host ({snap.host}, kernel {snap.kernel}) under policy "
            f"{policy.name!r}: " + "; ".join(plan.refusals),
            plan.refusals,
        )
    return plan.target


def stage_move(hook: Hook) -> int:
    """``migrate`` / ``restore``: would this host take the guest? Before QEMU exists."""
    policy = hook.policy()
    if policy is None:
        return 0
    from hvcpolicy.planner import check_migration

    snap = hook.snapshot()
    meta = hook.domain.meta
    applied = meta.applied.registers if meta is not None and meta.applied is not None else None
    verdict = check_migration(policy, snap, applied=applied)
    what = "an incoming migration" if hook.stage == "migrate" else "a restore"
    if not verdict.ok:
        raise Refused(
            f"hvcpolicy: this host ({snap.host}, kernel {snap.kernel}) refuses {what} of domain "
            f"{hook.domain.name!r} under policy {policy.name!r}: " + "; ".join(verdict.reasons),
            verdict.reasons,
        )
    hook.log("allowed", before=_regs(applied), reason=f"basis={verdict.basis}")
    return 0


def stage_started(hook: Hook) -> int:
    policy = hook.policy()
    if policy is None:
        return 0
    try:
        qmp = HookQMP(_qmp_socket(hook), hook.conf.qmp_timeout)
    except Unavailable as err:
        return _unsupported(hook, policy, err)
    with qmp:
        try:
            qmp.vcpus()
        except Unavailable as err:
            return _unsupported(hook, policy, err)
        state = qmp.runstate()
        hook.audit["stage"] = f"started/{state}"
        if state == "prelaunch":
            return _apply_prelaunch(hook, policy, qmp)
        if state == "inmigrate":
            return _apply_inmigrate(hook, policy, qmp)
        return _verify(hook, policy, qmp, state)


def stage_reconnect(hook: Hook) -> int:
    """libvirtd restarted: verify and log; failing here would kill a running guest."""
    try:
        policy = hook.policy()
        if policy is None:
            return 0
        with HookQMP(_qmp_socket(hook), hook.conf.qmp_timeout) as qmp:
            live = qmp.read_all()
        target = _expected(hook, policy, live)
        from hvcpolicy.planner import verify

        diffs = verify(target, live)
        if diffs:
            hook.log("differs", warning=True, before=_regs(live), reason="; ".join(diffs))
        else:
            hook.log("verified", after=_regs(live))
    except Exception as err:  # never fail: log it
        hook.log("error", warning=True, reason=f"{type(err).__name__}: {err}")
    return 0


def _unsupported(hook: Hook, policy: Policy, err: Unavailable) -> int:
    from hvcpolicy.errors import InterfaceMissing

    if isinstance(err, InterfaceMissing) and policy.unsupported_qemu == "warn":
        hook.log("unsupported-qemu-warned", warning=True, reason=err.message)
        return 0
    raise err


def _qmp_socket(hook: Hook) -> str:
    sock = hook.domain.qmp_socket
    if not sock:
        raise Unavailable(
            f"domain {hook.domain.name!r} has no QMP socket for hvcpolicy: add "
            "<hvc:qmp socket=...> or run `hvcpolicy attach`"
        )
    return sock


def _expected(hook: Hook, policy: Policy, live: Mapping[int, int]) -> dict[int, int]:
    """What the guest's registers should read: ``<hvc:applied>`` when recorded, else the plan."""
    meta = hook.domain.meta
    if meta is not None and meta.applied is not None:
        return {rid: v for rid, v in meta.applied.registers.items() if rid in live}
    from hvcpolicy.planner import plan_start

    return plan_start(policy, live, _host_registers(hook, live)).target


def _host_registers(hook: Hook, live: Mapping[int, int] | None) -> Mapping[int, int] | None:
    """This host's fresh values (the kernel's PSCI limit), else what the guest reads."""
    try:
        return hook.snapshot().registers
    except HvcError:
        return live


def apply_prelaunch(
    policy: Policy, qmp: HookQMP, host: Mapping[int, int] | None, who: str
) -> tuple[dict[int, int], dict[int, int]]:
    """Plan, write through the first vCPU, read back every vCPU and verify; -> (before, after).
    Shared by the hook's prelaunch stage and ``hvcpolicy start``."""
    from hvcpolicy.planner import plan_start, verify

    before = qmp.read_all()
    plan = plan_start(policy, before, host if host is not None else before)
    if not plan.ok:
        raise Refused(
            f"hvcpolicy: {who} refused under policy {policy.name!r}: " + "; ".join(plan.refusals),
            plan.refusals,
        )
    if plan.writes:
        # Again right before the write: another monitor may have run the guest since, and KVM
        # would still take a PSCI_VERSION write then (it has no "already ran" check for it).
        state = qmp.runstate()
        if state != "prelaunch":
            raise Unavailable(
                f"hvcpolicy: {who}: the guest went from prelaunch to {bounded(state, 40)} before "
                "the write (another monitor?); nothing was written"
            )
        qmp.write(plan.writes)
    after = qmp.read_every_vcpu()
    diffs = verify(plan.target, after)
    if diffs:
        raise Refused(f"hvcpolicy: {who}: the write did not hold: {'; '.join(diffs)}", diffs)
    return before, after


def _apply_prelaunch(hook: Hook, policy: Policy, qmp: HookQMP) -> int:
    host = _host_registers(hook, None)
    before, after = apply_prelaunch(policy, qmp, host, f"domain {hook.domain.name!r}")
    hook.log("applied", before=_regs(before), after=_regs(after))
    meta = hook.domain.meta
    if meta is not None:
        qmp.close()  # before any fork: QEMU serves one QMP client at a time
        element = _applied_element(hook, after)
        from hvcpolicy import startlock

        # `hvcpolicy start` drives this start: it records and resumes, and no virsh races it
        handed = startlock.hand_over(hook.conf.run_dir, hook.argv[0], before, after, element)
        if not handed and hook.served:  # start's own lock, lost: and never fork from start
            raise Unavailable(f"hvcpolicy: {hook.argv[0]!r}: the start lock was lost")
        if not handed:
            _spawn_recorder(hook, element, meta.resume_after_apply)
    return 0


def _apply_inmigrate(hook: Hook, policy: Policy, qmp: HookQMP) -> int:
    from hvcpolicy.planner import plan_inmigrate

    meta = hook.domain.meta
    applied = meta.applied.registers if meta is not None and meta.applied is not None else None
    before = qmp.read_all()
    plan = plan_inmigrate(policy, before, applied)
    if not plan.ok:
        raise Refused(
            f"hvcpolicy: incoming domain {hook.domain.name!r}: " + "; ".join(plan.refusals),
            plan.refusals,
        )
    if plan.writes:
        qmp.write(plan.writes)
    hook.log(
        "cleared" if plan.writes else "nothing-to-clear",
        before=_regs(before),
        after=_regs(plan.writes),
    )
    return 0


def _verify(hook: Hook, policy: Policy, qmp: HookQMP, state: str) -> int:
    from hvcpolicy.planner import verify

    live = qmp.read_every_vcpu()
    target = _expected(hook, policy, live)
    diffs = verify(target, live)
    if not diffs:
        hook.log("verified", after=_regs(live))
        return 0
    if state == "running" and policy.already_running == "warn":
        hook.log("differs-warned", warning=True, before=_regs(live), reason="; ".join(diffs))
        return 0
    if state == "running":
        raise Refused(
            f"hvcpolicy: domain {hook.domain.name!r} is already running and its firmware registers "
            f"differ from policy {policy.name!r} ({'; '.join(diffs)}); it is too late to write "
            f"them: start it with `hvcpolicy start {hook.domain.name}` or "
            f'`virsh start --paused {hook.domain.name}` (with <hvc:resume after="apply"/>)',
            diffs,
        )
    raise Refused(
        f"hvcpolicy: domain {hook.domain.name!r} ({state}) does not match "
        + (
            "its <hvc:applied> record"
            if hook.domain.meta and hook.domain.meta.applied
            else f"policy {policy.name!r}"
        )
        + f": {'; '.join(diffs)}",
        diffs,
    )


def _regs(registers: Mapping[int, int] | None) -> str:
    from hvcpolicy.audit import regs_text

    return regs_text(registers)


# --- QMP: the hook's own small, synchronous, bounded client -----------------------------------


class HookQMP:
    """A blocking QMP client for the hook: no asyncio to import, every wait bounded.

    Speaks the firmware-register interface of SPEC.md section 8: vCPUs from ``query-cpus-fast``,
    the QOM property ``kvm-firmware-registers`` on each vCPU (ids as ``0x`` strings).

    ``timeout`` bounds each command as a whole (and connect, greeting and negotiation together):
    a QEMU that drips a reply a few bytes at a time cannot stretch it. Every command carries its
    own id; events and replies with another id are skipped; a message is at most ``MAX_MESSAGE``
    bytes.
    """

    PROP = "kvm-firmware-registers"
    MAX_MESSAGE = 1 << 20

    def __init__(self, path: str, timeout: float) -> None:
        import time

        from hvcpolicy.errors import QMPTimeout

        self.path = path
        self.timeout = timeout
        self.sock = self._socket()
        self.buf = bytearray()
        self._scanned = 0  # bytes of self.buf already known to hold no newline
        self._ids = 0
        self._vcpus: list[str] | None = None
        deadline = time.monotonic() + timeout
        try:
            self._connect(path, deadline)
            greeting = self._message(deadline)
            if not isinstance(greeting.get("QMP"), dict):
                raise Unavailable(f"QMP {path}: not a QMP greeting (no 'QMP' object)")
            self.cmd("qmp_capabilities", expect=dict, deadline=deadline)
        except TimeoutError:
            self.close()
            raise QMPTimeout(f"QMP {path}: no answer within {timeout:g} s") from None
        except OSError as err:
            self.close()
            raise Unavailable(f"QMP {path}: cannot connect: {err.strerror or err}") from None
        except BaseException:
            self.close()
            raise

    def _connect(self, path: str, deadline: float) -> None:
        """QEMU (or a proxy in front of it) may still be creating the socket: retry until the
        deadline. Each attempt first checks the socket is one root can trust (trust.py)."""
        import time

        from hvcpolicy.trust import check_qmp_socket

        while True:
            try:
                check_qmp_socket(path)
                self._settimeout(deadline)
                self.sock.connect(path)
                return
            except (FileNotFoundError, ConnectionRefusedError, PermissionError):
                if time.monotonic() >= deadline:
                    raise
                self.sock.close()
                self.sock = self._socket()
                time.sleep(min(0.02, max(0.0, deadline - time.monotonic())))

    def _socket(self) -> Any:
        import _socket  # socket.py imports enum, selectors and more; the C module is enough

        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        return sock

    def _settimeout(self, deadline: float) -> None:
        """The socket's timeout: what is left until ``deadline``; past it, TimeoutError."""
        import time

        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        self.sock.settimeout(left)

    def __enter__(self) -> HookQMP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def _message(self, deadline: float) -> dict[str, Any]:
        """The next message, whole, before ``deadline`` (TimeoutError past it)."""
        from hvcpolicy.lean import json_loads  # json imports re and compiles its patterns

        while True:
            end = self.buf.find(b"\n", self._scanned)
            if end >= 0:
                break
            self._scanned = len(self.buf)
            if len(self.buf) > self.MAX_MESSAGE:
                raise Unavailable(
                    f"QMP {self.path}: a message larger than {self.MAX_MESSAGE >> 20} MiB"
                )
            self._settimeout(deadline)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise Unavailable(f"QMP {self.path}: connection closed")
            self.buf += chunk
        if end > self.MAX_MESSAGE:
            raise Unavailable(
                f"QMP {self.path}: a message larger than {self.MAX_MESSAGE >> 20} MiB"
            )
        line = bytes(self.buf[:end])
        del self.buf[: end + 1]
        self._scanned = 0
        try:
            doc = json_loads(line)
        except (ValueError, RecursionError):
            raise Unavailable(f"QMP {self.path}: not JSON: {line[:80]!r}") from None
        if not isinstance(doc, dict):
            raise Unavailable(f"QMP {self.path}: not a JSON object")
        return doc

    def _next_id(self) -> str:
        self._ids += 1
        return f"hvc-{os.getpid()}-{self._ids}"

    def _send(self, data: bytes, deadline: float) -> None:
        self._settimeout(deadline)
        self.sock.sendall(data)

    def _result(self, name: str, msg: dict[str, Any], reply: dict[str, Any], expect: Any) -> Any:
        """The ``return`` of ``reply`` (of type ``expect`` when given); QMPError on ``error``."""
        from hvcpolicy.errors import QMPError, bounded

        if "error" in reply:
            err = reply["error"] if isinstance(reply["error"], dict) else {}
            cls = bounded(str(err.get("class", "?")))
            desc = bounded(str(err.get("desc", "")))
            raise QMPError(f"QMP {name}: {cls}: {desc}", sent=msg, received=reply, error_class=cls)
        if "return" not in reply:
            raise QMPError(
                f"QMP {name}: a reply with neither 'return' nor 'error'", sent=msg, received=reply
            )
        ret = reply["return"]
        if expect is not None and not isinstance(ret, expect):
            raise QMPError(
                f"QMP {name}: 'return' is {type(ret).__name__}, not {expect.__name__}",
                sent=msg,
                received=reply,
            )
        return ret

    def cmd(
        self,
        name: str,
        arguments: dict[str, Any] | None = None,
        expect: Any = None,
        deadline: float | None = None,
    ) -> Any:
        """Run one command; its reply within ``timeout`` (or ``deadline``) as a whole."""
        import time

        from hvcpolicy.errors import QMPTimeout
        from hvcpolicy.lean import json_dumps

        if deadline is None:
            deadline = time.monotonic() + self.timeout
        msg: dict[str, Any] = {"execute": name, "id": self._next_id()}
        if arguments is not None:
            msg["arguments"] = arguments
        try:
            self._send(json_dumps(msg).encode(), deadline)
            while True:
                reply = self._message(deadline)
                if reply.get("id") != msg["id"] or "event" in reply:
                    continue  # an event, or a stray reply: not ours
                return self._result(name, msg, reply, expect)
        except TimeoutError:
            raise QMPTimeout(f"QMP {name}: no answer within {self.timeout:g} s", sent=msg) from None
        except OSError as err:
            raise Unavailable(f"QMP {name}: {err.strerror or err}") from None

    def pipelined(self, name: str, batch: list[dict[str, Any]], expect: Any = None) -> list[Any]:
        """Send every command of ``batch`` at once, then collect the replies by id: one round
        trip plus QEMU's work, not one round trip per vCPU. ``timeout`` bounds the batch."""
        import time

        from hvcpolicy.errors import QMPTimeout
        from hvcpolicy.lean import json_dumps

        deadline = time.monotonic() + self.timeout
        msgs = [{"execute": name, "arguments": a, "id": self._next_id()} for a in batch]
        wanted = {str(m["id"]) for m in msgs}
        replies: dict[str, dict[str, Any]] = {}
        try:
            self._send("".join(json_dumps(m) for m in msgs).encode(), deadline)
            while len(replies) < len(msgs):
                reply = self._message(deadline)
                rid = reply.get("id")
                if isinstance(rid, str) and rid in wanted and "event" not in reply:
                    replies[rid] = reply
        except TimeoutError:
            raise QMPTimeout(f"QMP {name}: no answer within {self.timeout:g} s") from None
        except OSError as err:
            raise Unavailable(f"QMP {name}: {err.strerror or err}") from None
        return [self._result(name, m, replies[str(m["id"])], expect) for m in msgs]

    def runstate(self) -> str:
        status = self.cmd("query-status", expect=dict).get("status")
        if not isinstance(status, str):
            raise Unavailable("QMP query-status: no 'status' string")
        return status

    def vcpus(self) -> list[str]:
        if self._vcpus is None:
            cpus = self.cmd("query-cpus-fast", expect=list)
            paths = [c.get("qom-path") if isinstance(c, dict) else None for c in cpus]
            if not all(isinstance(p, str) for p in paths):
                raise Unavailable("QMP query-cpus-fast: a vCPU without a 'qom-path' string")
            if not paths:
                raise Unavailable("QMP query-cpus-fast: no vCPUs")
            props = self.cmd("qom-list", {"path": paths[0]}, expect=list)
            if not any(isinstance(p, dict) and p.get("name") == self.PROP for p in props):
                from hvcpolicy.errors import InterfaceMissing

                raise InterfaceMissing(
                    f"QEMU at {self.path} has no {self.PROP} property on its vCPUs: it offers no "
                    "firmware-register interface"
                )
            self._vcpus = [str(p) for p in paths]
        return self._vcpus

    def read(self, path: str) -> dict[int, int]:
        return self._registers(
            self.cmd("qom-get", {"path": path, "property": self.PROP}, expect=dict)
        )

    def _registers(self, doc: Any) -> dict[int, int]:
        if not isinstance(doc, dict):
            raise Unavailable(f"QMP qom-get {self.PROP}: not an object")
        try:
            out = {int(k, 0): v for k, v in doc.items()}
        except (TypeError, ValueError):
            raise Unavailable(f"QMP qom-get {self.PROP}: ids and values malformed") from None
        if not all(type(v) is int for v in out.values()):
            raise Unavailable(f"QMP qom-get {self.PROP}: ids and values malformed")
        return out

    def read_all(self) -> dict[int, int]:
        """Registers are per VM: the first vCPU's view."""
        return self.read(self.vcpus()[0])

    def read_every_vcpu(self) -> dict[int, int]:
        paths = self.vcpus()
        docs = self.pipelined(
            "qom-get", [{"path": p, "property": self.PROP} for p in paths], expect=dict
        )
        first = self._registers(docs[0])
        for path, doc in zip(paths[1:], docs[1:], strict=True):
            if self._registers(doc) != first:
                raise Unavailable(f"vCPU {path} reads other firmware registers than {paths[0]}")
        return first

    def write(self, writes: Mapping[int, int]) -> None:
        value = {f"0x{rid:016x}": v for rid, v in writes.items()}
        self.cmd("qom-set", {"path": self.vcpus()[0], "property": self.PROP, "value": value})


# --- the detached recorder ------------------------------------------------------------------


def _applied_element(hook: Hook, registers: Mapping[int, int]) -> str:
    meta = hook.domain.meta
    assert meta is not None
    try:
        snap: Snapshot | None = hook.snapshot()
    except HvcError:
        snap = None
    return applied_element(meta, registers, snap)


def applied_element(meta: DomainPolicy, registers: Mapping[int, int], snap: Snapshot | None) -> str:
    """The domain's ``<hvc:policy>`` with ``<hvc:applied>``: what this host (its snapshot's
    name and kernel, else uname's) wrote, and when. Shared with ``hvcpolicy start``."""
    import time

    from hvcpolicy.domainxml import Applied, render_policy, with_applied

    u = os.uname()
    applied = Applied(
        host=snap.host if snap is not None else u.nodename,
        kernel=snap.kernel if snap is not None else u.release,
        at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        registers=dict(registers),
    )
    return render_policy(with_applied(meta, applied))


def _spawn_recorder(hook: Hook, element: str, resume: bool) -> None:
    """Fork a fully detached child (setsid, fds 0-2 on /dev/null, nothing else open) that, once
    libvirt's start job ends, records ``element`` in the live XML and, when asked, resumes.
    It may call libvirt: it is no longer inside the hook, so it simply waits for the job."""
    if os.fork():
        return  # the hook exits right after: the child is reparented, no zombie is left
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.closerange(3, 65536)  # the QMP socket above all: QEMU serves one client at a time
        rc = _record_and_resume(hook, element, resume)
    except BaseException:
        rc = 1
    os._exit(rc)


def unprefixed(element: str) -> str:
    """``<hvc:policy xmlns:hvc=...>`` as libvirt's metadata API wants it: without the prefix
    and declaration (libvirt adds both from the key and URI it is given)."""
    import re

    from hvcpolicy import XMLNS

    element = element.replace(f' xmlns:hvc="{XMLNS}"', "", 1)
    return re.sub(r"<(/?)hvc:", r"<\1", element)


def libvirt_uri() -> str:
    return "qemu:///system" if os.getuid() == 0 else "qemu:///session"


def _record_and_resume(hook: Hook, element: str, resume: bool) -> int:
    import subprocess

    from hvcpolicy import XMLNS

    element = unprefixed(element)
    name = hook.domain.uuid or hook.domain.name
    # One virsh, two commands: the metadata first, so the guest never runs unrecorded.
    script = [
        "metadata",
        "--domain",
        name,
        "--uri",
        XMLNS,
        "--key",
        "hvc",
        "--live",
        "--set",
        element,
    ]
    cmds = _virsh_quote(script) + (f" ; resume --domain {name}" if resume else "")
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "HOME": os.environ.get("HOME", "/"),
        "LC_ALL": "C",
        "LIBVIRT_AUTOSTART": "0",
    }
    try:
        done = subprocess.run(
            ["virsh", "-q", "-c", libvirt_uri(), cmds],
            env=env,
            capture_output=True,
            timeout=60,
            check=False,
        )
        ok = done.returncode == 0
        detail = done.stderr.decode("utf-8", "replace").strip()
    except (OSError, subprocess.TimeoutExpired) as err:
        ok, detail = False, str(err)
    hook.audit["stage"] = "started/recorder"
    hook.log(
        ("recorded-resumed" if resume else "recorded") if ok else "record-failed",
        warning=not ok,
        reason=detail or "-",
    )
    return 0 if ok else 1


def _virsh_quote(words: list[str]) -> str:
    """virsh's own command-line quoting (single quotes; a quote inside is '\\'')."""
    return " ".join("'" + w.replace("'", "'\\''") + "'" for w in words)


# --- entry ------------------------------------------------------------------------------------

_STAGES: dict[str, Callable[[Hook], int]] = {
    "prepare": stage_prepare,
    "started": stage_started,
    "migrate": stage_move,
    "restore": stage_move,
    "reconnect": stage_reconnect,
}


_MAX_XML = 8 << 20  # domainxml.MAX_XML, without importing it before the stage needs it


def main(argv: list[str], stdin: IO[bytes]) -> int:
    """``argv``: DOMAIN OP SUBOP EXTRA as libvirt passes them; ``stdin``: the domain XML (its
    head already read by the sh pre-filter, in ``HVC_XML_HEAD``)."""
    if len(argv) < 2 or argv[1] not in _STAGES:
        return 0
    head = os.environ.pop("HVC_XML_HEAD", "").encode("utf-8", "surrogateescape")
    rc, message = run(argv, _read_xml(head, stdin), load_config)
    if message:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
    return rc


def serve(argv: list[str], stdin: IO[bytes], conf: Config) -> tuple[int, str]:
    """The stage run inside ``hvcpolicy start``, which holds the start lock and serves the sh
    pre-filter's request (startlock.py) from its warm interpreter: the same run as ``main``'s,
    with start's config. -> (exit status, the message the hook would print)."""
    return run(argv, _read_xml(b"", stdin), lambda: conf, served=True)


def _read_xml(head: bytes, stdin: IO[bytes]) -> bytes:
    try:
        # at most one byte past the limit: parse_domain refuses it, the rest is never read
        return head + stdin.read(max(0, _MAX_XML + 1 - len(head)))
    except OSError:
        return head


def run(
    argv: list[str], xml: bytes, config: Callable[[], Config], served: bool = False
) -> tuple[int, str]:
    """One stage, every error one audit line and one message; -> (exit status, message)."""
    stage = argv[1]
    hook: Hook | None = None
    try:
        hook = Hook(argv, xml, config())
        if served:
            hook.served = True
            hook.audit["by"] = "start"
        return _STAGES[stage](hook), ""
    except HvcError as err:
        outcome = "refused" if isinstance(err, Refused) else "error"
        return _fail(hook, stage, outcome, err.message)
    except Exception as err:  # a bug: still one line, and fail closed except on reconnect
        return _fail(hook, stage, "error", f"internal error: {type(err).__name__}: {err}")


def _fail(hook: Hook | None, stage: str, outcome: str, message: str) -> tuple[int, str]:
    if not message.startswith("hvcpolicy: "):
        message = "hvcpolicy: " + message
    if hook is not None:
        hook.log(outcome, warning=True, reason=message)
    else:
        from hvcpolicy import audit

        audit.record({"stage": stage, "outcome": outcome, "reason": message}, None, True)
    if stage == "reconnect":
        return 0, ""
    return 1, message


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], sys.stdin.buffer))
