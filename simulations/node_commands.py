"""An institution's and a deployment's set-up commands: ``fedft certs`` (TLS certificates),
``fedft node-key`` (a SuperNode's authentication key pair), ``fedft policy init`` (what the
institution's client accepts)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedft.rundir import atomic_write_text


def add_node_commands(commands: argparse._SubParsersAction) -> None:
    """``fedft certs``, ``fedft node-key`` and ``fedft policy init``."""
    _add_key_commands(commands)
    _add_policy_commands(commands)


def supernode_command(flower_supernode: str, poll_s: float | None = None) -> list[str]:
    """The start of an institution's SuperNode command line, before Flower's own arguments:
    ``flower_supernode`` (the path of Flower's executable), or with ``poll_s`` the same SuperNode
    through ``fedft node supernode --poll-interval POLL_S --`` in this Python."""
    if poll_s is None:
        return [flower_supernode]
    return [sys.executable, "-m", "simulations.cli", "node", "supernode", "--poll-interval", str(poll_s), "--"]


def _certs(args: argparse.Namespace) -> int:
    from fedft.deploy.certs import explain, make_certificates

    try:
        paths = make_certificates(Path(args.out), args.hosts, days=args.days)
    except (FileExistsError, ValueError) as err:
        print(f"fedft: error: {err}", file=sys.stderr)
        return 2
    print(explain(paths, args.hosts))
    return 0


def _node_key(args: argparse.Namespace) -> int:
    from fedft.deploy.certs import make_node_key

    try:
        private, public = make_node_key(Path(args.out), args.name)
    except (FileExistsError, ValueError) as err:
        print(f"fedft: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {private} (keep it here: flower-supernode --auth-supernode-private-key {private})")
    print(f"wrote {public} (send it to the coordinator: flwr supernode register {public.name} <superlink>)")
    return 0


def _add_key_commands(commands: argparse._SubParsersAction) -> None:
    """``fedft certs`` and ``fedft node-key``: a deployment's TLS certificates and SuperNode keys."""
    certs = commands.add_parser("certs", help="create a CA and a SuperLink TLS certificate")
    certs.add_argument("hosts", nargs="+", help="host names / IP addresses the SuperLink is reached at")
    certs.add_argument("--out", default="certificates", help="directory for ca.crt, ca.key, server.crt, server.key")
    certs.add_argument("--days", type=int, default=365, help="validity in days")
    certs.set_defaults(handler=_certs)
    node_key = commands.add_parser("node-key", help="create a SuperNode authentication key pair")
    node_key.add_argument("name", help="file name of the private key (the public key gets .pub)")
    node_key.add_argument("--out", default="keys", help="directory for the key pair")
    node_key.set_defaults(handler=_node_key)


def _policy_init(args: argparse.Namespace) -> int:
    """``fedft policy init``: a commented policy template, the model's checksum filled in."""
    from fedft.federated.policy import PolicyError, policy_template, weights_sha256

    out = Path(args.out)
    if out.exists():
        print(f"fedft: error: {out} exists; remove it or choose another --out (nothing was written)", file=sys.stderr)
        return 2
    model, checksum = "", ""
    if args.model:
        model_dir = Path(args.model).resolve()
        if not model_dir.is_dir():
            print(f"fedft: error: --model {args.model}: not a local model directory", file=sys.stderr)
            return 2
        try:
            checksum = weights_sha256(model_dir)
        except PolicyError as err:
            print(f"fedft: error: {err}", file=sys.stderr)
            return 2
        model = str(model_dir)
    atomic_write_text(out, policy_template(model, checksum))
    print(f"wrote {out}" + (f" (model {model}, weights sha256 {checksum[:12]}...)" if model else ""))
    print(f"start the SuperNode with --node-config \"... policy='{out.resolve()}'\"")
    return 0


def _add_policy_commands(commands: argparse._SubParsersAction) -> None:
    policy = commands.add_parser("policy", help="an institution's policy: what its client accepts")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True)
    init = policy_commands.add_parser("init", help="write a commented policy template")
    init.add_argument("--out", default="fedft-policy.toml", help="the policy file to write (must not exist)")
    init.add_argument("--model", help="the base model directory to pin (its weights' SHA-256 is computed)")
    init.set_defaults(handler=_policy_init)
