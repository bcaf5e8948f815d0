"""The libvirt qemu hook: what libvirt runs, and nothing else imports (outside ``cli/``).

``hooks/qemu`` (the sh pre-filter) execs ``python3 -I -S`` on ``hvcpolicy.hook.entry.main`` with
DOMAIN OP SUB X, the domain XML on stdin. While ``hvcpolicy start`` (or this hook's detached
child) drives a start, the stages of that start step aside (``startlock.steps_aside``; the sh
pre-filter makes the same test without Python): ``start`` enforces, records and resumes itself.

libvirt runs the hook synchronously with the domain locked, so every stage imports only what it
needs (no argparse, yaml, jsonschema, asyncio or libvirt on ``prepare``/``migrate``/``restore``),
never calls libvirt, bounds every QMP wait, and leaves no child holding its stdout/stderr. This
file imports nothing: the entry is one import away.

- ``entry``: argv and stdin in, one stage run, every error one audit line and one message;
- ``config``: ``/etc/hvcpolicy/hook.conf`` (or a session user's own);
- ``context``: one hook run (the stage, the domain, its policy, this host's snapshot, the log);
- ``stages``: ``prepare``, ``started``, ``migrate``/``restore``, ``reconnect`` (SPEC.md section 7);
- ``recorder``: the detached child that records ``<hvc:applied>`` (and resumes) once libvirt's
  start job ends;
- ``install``: what ``hvcpolicy install-hook`` writes (script, config, policy cache).
"""
