"""``consent-gateway demo``: an embedded demo FHIR server with the gateway in front of it."""

from __future__ import annotations

import argparse
import asyncio
import copy
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from gateway.app import RunningGateway, build_state, configure_logging, start, until_signalled
from gateway.config import build_settings
from gateway.demo.issuer import LocalIssuer
from gateway.demo.server import demo_server
from gateway.web.middleware import JsonLogFormatter


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("demo", help="run the gateway in front of an embedded demo FHIR server")
    parser.add_argument("--port", type=int, default=8080, help="gateway proxy port (default 8080)")
    parser.add_argument("--admin-port", type=int, default=9090, help="gateway admin port (default 9090)")
    parser.add_argument("--upstream-port", type=int, default=0, help="demo FHIR server port (default: any free)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the audit log and demo files")
    parser.add_argument("--quiet-log", action="store_true", help="do not print the access log")
    parser.add_argument("--shadow-port", type=int, default=8081,
                        help="a second gateway in shadow (report-only) mode (default 8081; headers mode only)")
    parser.add_argument("--jwt", action="store_true",
                        help="SMART on FHIR tokens instead of X-Actor headers: starts a local token issuer")


def _write_examples(server: Any, directory: Path) -> None:
    for key, resource in server.resources.items():
        (directory / (key.replace("/", "-") + ".json")).write_bytes(orjson.dumps(resource, option=orjson.OPT_INDENT_2))


def write_draft(server: Any, directory: Path) -> Path:
    """A draft revision of Bob's consent for ``whatif``: his GP may see HIV records, Dr. Psych nothing."""
    draft = copy.deepcopy(server.resources["Consent/consent-bob-optin-not-jones"])
    role = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "PRCP"}]}
    draft["provision"].setdefault("provision", []).extend([
        {"type": "permit", "actor": [{"role": role, "reference": {"reference": "Practitioner/dr-gp"}}],
         "securityLabel": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "HIV"}]},
        {"type": "deny", "actor": [{"role": role, "reference": {"reference": "Practitioner/dr-psych"}}]},
    ])
    path = directory / "draft-consent-bob.json"
    path.write_bytes(orjson.dumps(draft, option=orjson.OPT_INDENT_2))
    return path


def log_to_file(path: Path) -> None:
    """Also keep the gateway's JSON-lines log (decision lines included) in ``path`` for ``whatif``."""
    handler = logging.FileHandler(path)
    handler.setFormatter(JsonLogFormatter())
    root = logging.getLogger("gateway")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False


def officer_instructions(port: int, shadow_port: int | None, admin: int, directory: Path, exe: str, upstream: str) -> str:
    """The privacy officer's part of the demo: shadow mode, what-if, disclosures, review page."""
    g, a = f"http://localhost:{port}", f"http://127.0.0.1:{admin}"
    if shadow_port is None:
        shadow = "# 7. shadow mode: the shadow gateway was not started (its port was taken; see --shadow-port)\n"
    else:
        s = f"http://localhost:{shadow_port}"
        shadow = f"""# 7. shadow mode: a second gateway on {s} decides exactly the same way but filters nothing;
#    X-Consent-Decision-Shadow says what enforce mode would have done
curl -s -D - -o /dev/null -H 'X-Actor: Practitioner/dr-jones' {s}/Observation/bob-cbc | grep -i '^x-consent-decision'
curl -s -D - -o /dev/null -H 'X-Actor: Practitioner/dr-gp' '{s}/Condition?patient=pat-bob' | grep -i '^x-consent-decision'
grep '"mode":"shadow"' {directory}/gateway.log | tail -n 2
"""
    return f"""{shadow}
# 8. what would a draft consent change? (replays the reads in the decision log)
{exe} whatif --consent {directory}/draft-consent-bob.json --log {directory}/gateway.log --patient Patient/pat-bob --upstream {upstream}

# 9. accounting of disclosures: an emergency read of Bob's HIV and substance-use records (released
#    with DS4P labels in meta.security, NORDSLCD and the 42 CFR Part 2 notice) is an AuditEvent
curl -s -H 'X-Actor: Practitioner/dr-er' -H 'X-Break-Glass: Medical emergency' '{g}/Condition?patient=pat-bob'
curl -s '{a}/admin/disclosures?patient=Patient/pat-bob'

# 10. break-glass review page (open in a browser; "Mark reviewed" is itself audited)
{a}/admin/break-glass
"""


def instructions(port: int, admin: int, directory: Path, exe: str) -> str:
    g, a = f"http://localhost:{port}", f"http://127.0.0.1:{admin}"
    doc = "-H 'X-Actor: Practitioner/dr-gp'"
    return f"""
FHIR Consent Gateway demo: gateway on {g}, admin on {a}
Demo patients: pat-alice (opted in; mental health only for her psychiatrist dr-psych),
pat-bob (HIV, opioid use disorder under 42 CFR Part 2; opted in, but not dr-jones),
pat-carol (opted out), pat-dana (shares with Organization/org-hospital; research permit;
genetic test; restricted R and V documents).

# 1. permit: a normal lab result
curl -s {doc} {g}/Observation/alice-cbc

# 2. filtered search: Bob's HIV and substance-use records are withheld from a general permit
curl -s {doc} '{g}/Condition?patient=pat-bob'

#    ...and Alice's psychiatrist sees her depression, her GP does not
curl -s -H 'X-Actor: Practitioner/dr-psych' '{g}/Condition?patient=pat-alice'
curl -s {doc} '{g}/Condition?patient=pat-alice'

# 3. deny: Bob said "not Dr. Jones"; Carol opted out
curl -si -H 'X-Actor: Practitioner/dr-jones' {g}/Observation/bob-cbc
curl -si {doc} {g}/Observation/carol-cbc

# 4. break-glass: an emergency read of Carol's record, audited (then later reads pass without the header)
curl -si -H 'X-Actor: Practitioner/dr-er' -H 'X-Break-Glass: Medical emergency' {g}/Condition/carol-pregnancy
curl -si -H 'X-Actor: Practitioner/dr-er' {g}/Condition/carol-pregnancy
tail -n 2 {directory}/audit.jsonl

# 5. metrics
curl -s {a}/metrics | grep '^consent_gateway_'

# 6. why? the decision explained
{exe} decide --consent {directory}/Consent-consent-bob-optin-not-jones.json --resource {directory}/Observation-bob-hiv-test.json --actor Practitioner/dr-gp
"""


# Demo users: (shell variable, fhirUser, extra claims).
DEMO_USERS = (
    ("GP", "Practitioner/dr-gp", {"scope": "openid fhirUser user/*.rs"}),
    ("PSYCH", "Practitioner/dr-psych", {"scope": "openid fhirUser user/*.rs"}),
    ("JONES", "Practitioner/dr-jones", {"scope": "openid fhirUser user/*.rs"}),
    ("ER", "Practitioner/dr-er", {"scope": "openid fhirUser user/*.rs"}),
    ("ALICE", "Patient/pat-alice", {"scope": "openid fhirUser launch/patient patient/*.rs", "patient": "pat-alice"}),
    ("LABS_ONLY", "Practitioner/dr-gp", {"scope": "openid fhirUser user/Observation.rs"}),
)


def jwt_instructions(port: int, admin: int, issuer: LocalIssuer, audience: str) -> str:
    """Tokens for each demo user (8 hours) and curl commands that use them."""
    g = f"http://localhost:{port}"
    tokens = "\n".join(
        f"export {var}={issuer.mint({'fhirUser': user, **claims}, audience=audience, lifetime_s=8 * 3600)}"
        for var, user, claims in DEMO_USERS
    )
    return f"""
FHIR Consent Gateway demo (SMART on FHIR tokens): gateway on {g}, admin on http://127.0.0.1:{admin}
Token issuer: {issuer.base_url} (keys made at start; JWKS at {issuer.base_url}/.well-known/jwks.json)
Tokens (8 hours): GP, PSYCH, JONES, ER are clinicians with user/*.rs; ALICE is a patient app
(patient/*.rs, confined to pat-alice); LABS_ONLY is dr-gp with user/Observation.rs only.

{tokens}

# discovery: no token needed
curl -s {g}/.well-known/smart-configuration
curl -s {g}/metadata | grep -o '"security":{{[^]]*]]'

# 1. permit, and the filtered search: Bob's HIV and substance-use records are withheld
curl -s -H "Authorization: Bearer $GP" {g}/Observation/alice-cbc
curl -s -H "Authorization: Bearer $GP" '{g}/Condition?patient=pat-bob'
curl -s -H "Authorization: Bearer $PSYCH" '{g}/Condition?patient=pat-alice'

# 2. deny: Bob said "not Dr. Jones"
curl -si -H "Authorization: Bearer $JONES" {g}/Observation/bob-cbc

# 3. scopes decide first: Observation only; a patient app sees its own compartment only
curl -si -H "Authorization: Bearer $LABS_ONLY" {g}/Condition/alice-htn
curl -s -H "Authorization: Bearer $ALICE" '{g}/Observation'
curl -si -H "Authorization: Bearer $ALICE" {g}/Observation/bob-cbc

# 4. break-glass stays a header
curl -si -H "Authorization: Bearer $ER" -H 'X-Break-Glass: Medical emergency' {g}/Condition/carol-pregnancy

# 5. no token, or X-Actor in jwt mode
curl -si {g}/Observation/alice-cbc
curl -si -H "Authorization: Bearer $GP" -H 'X-Actor: Practitioner/dr-psych' {g}/Observation/alice-cbc

Press Ctrl-C to stop.
"""


async def _start_issuer() -> tuple[LocalIssuer, web.AppRunner]:
    issuer = LocalIssuer()
    runner = web.AppRunner(issuer.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    issuer.base_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    return issuer, runner


async def _run(args: argparse.Namespace, directory: Path) -> int:
    server = demo_server()
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", args.upstream_port)
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        print(f"consent-gateway demo: demo FHIR server port {args.upstream_port} is not free ({exc.strerror})", file=sys.stderr)
        return 2
    upstream_port = runner.addresses[0][1]
    _write_examples(server, directory)
    write_draft(server, directory)
    upstream = f"http://127.0.0.1:{upstream_port}/fhir"
    config: dict[str, Any] = {
        "upstream": {"url": upstream, "health_interval_s": 5},
        "listen": {"host": "127.0.0.1", "port": args.port},
        "admin": {"host": "127.0.0.1", "port": args.admin_port},
        "audit": {"path": str(directory / "audit.jsonl")},
    }
    issuer = issuer_runner = None
    audience = f"http://localhost:{args.port}"
    if args.jwt:
        issuer, issuer_runner = await _start_issuer()
        config["auth"] = {"mode": "jwt", "jwt": {"issuer": issuer.base_url, "audience": audience}}
    settings = build_settings(config)
    try:
        running = await start(build_state(settings))
    except OSError as exc:
        await runner.cleanup()
        if issuer_runner is not None:
            await issuer_runner.cleanup()
        print(f"consent-gateway demo: cannot listen on port {args.port} or {args.admin_port}: {exc.strerror}; "
              "choose others with --port / --admin-port", file=sys.stderr)
        return 2
    shadow = None
    if issuer is not None:
        print(jwt_instructions(running.proxy_port, running.admin_port, issuer, audience), flush=True)
    else:
        shadow = await _start_shadow(args, upstream, directory)
        exe = os.path.abspath(sys.argv[0])
        print(instructions(running.proxy_port, running.admin_port, directory, exe)
              + officer_instructions(running.proxy_port, shadow.proxy_port if shadow else None, running.admin_port,
                                     directory, exe, upstream)
              + "\nPress Ctrl-C to stop.\n", flush=True)
    await until_signalled()
    if shadow is not None:
        await shadow.stop()
    await running.stop()
    await runner.cleanup()
    if issuer_runner is not None:
        await issuer_runner.cleanup()
    print("demo stopped", file=sys.stderr)
    return 0


async def _start_shadow(args: argparse.Namespace, upstream: str, directory: Path) -> RunningGateway | None:
    """The same gateway in shadow mode, with its own audit files; None when its port is taken."""
    settings = build_settings({
        "upstream": {"url": upstream, "health_interval_s": 5},
        "listen": {"host": "127.0.0.1", "port": args.shadow_port},
        "admin": {"host": "127.0.0.1", "port": 0},
        "enforcement": {"mode": "shadow"},
        "audit": {"path": str(directory / "shadow-audit.jsonl")},
    })
    try:
        return await start(build_state(settings))
    except OSError:
        return None


def run(args: argparse.Namespace) -> int:
    if not args.quiet_log:
        configure_logging()
    directory = args.dir or Path(tempfile.mkdtemp(prefix="consent-gateway-demo-"))
    directory.mkdir(parents=True, exist_ok=True)
    log_to_file(directory / "gateway.log")
    return asyncio.run(_run(args, directory))
