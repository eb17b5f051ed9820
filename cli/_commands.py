"""
The ``pyflock`` subcommands, each an ``async`` function of an ``IControlClient``, the
parsed arguments and stdout; ``execute`` runs the one the arguments name and turns every
failure into one line on stderr and an exit status.
"""

from __future__ import annotations

import argparse
import traceback
from typing import IO, Any, Callable, Mapping, Optional, Sequence

import attr
from twisted.internet.defer import Deferred, FirstError, gatherResults
from twisted.internet.task import deferLater

from pyflock.cli._output import (
    NodeLabels, dataset_label, dataset_state, format_table, print_json, resolve_dataset,
    resolve_node, seconds_text, short_ids, utc_text, visible,
)
from pyflock.cli._parser import (
    _PROG, EXIT_FAILED, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, CLIError, version_text,
)
from pyflock.cli._settings import Settings, resolve_settings
from pyflock.common._client import (
    Conflict, ControlError, ControlUnreachable, IControlClient,
)
from pyflock.common._records import (
    Dataset, DatasetReport, Lease, Node, dataset_to_json, lease_to_json, node_to_api_json,
)
from pyflock.common._sizes import format_size


async def _gather(*deferreds: Deferred) -> list:
    try:
        return await gatherResults(list(deferreds), consumeErrors=True)
    except FirstError as e:
        e.subFailure.raiseException()
        raise  # pragma: no cover


# -- commands -------------------------------------------------------------------------

async def _version(client: IControlClient, args: argparse.Namespace, out: IO[str]) -> int:
    info = await client.version()
    if args.json:
        print_json(out, dict(info.to_json(), client=version_text()))
    else:
        out.write(f"client:          pyflock {version_text()}\n"
                  f"control service: pyflock {info.pyflock or 'unknown'} "
                  f"(API version {info.flocker})\n")
    return EXIT_OK


async def _status(client: Any, args: argparse.Namespace, out: IO[str]) -> int:
    """Issue 9: the control service's replicas, the one leading, and the etcd members."""
    status = await client.control_status()
    if args.json:
        print_json(out, status)
        return EXIT_OK
    out.write(f"store:   {visible(str(status.get('store')))}\n"
              f"leader:  {visible(str(status.get('leader') or 'none'))}\n"
              f"answered by: {visible(str(status.get('replica')))}\n\n")
    out.write(format_table(["REPLICA", "ADDRESS", "SINCE", "LEADER"], [
        [r.get("name", ""), r.get("address", ""),
         utc_text(r["since"]) if isinstance(r.get("since"), (int, float)) else "-",
         "yes" if r.get("leader") else ""] for r in status["replicas"]]))
    if status["etcd_members"] or status.get("etcd_error"):
        out.write("\n" + format_table(["ETCD MEMBER", "ID", "CLIENT URLS"], [
            [m.get("name", ""), m.get("id", ""), ",".join(m.get("client_urls", []))]
            for m in status["etcd_members"]]))
    if status.get("etcd_error"):
        out.write(f"etcd members not listed: {visible(str(status['etcd_error']))}\n")
    return EXIT_OK


async def _list_nodes(client: IControlClient, args: argparse.Namespace,
                      out: IO[str]) -> int:
    nodes, listing = await _gather(client.list_nodes(), client.list_datasets())
    nodes = sorted(nodes, key=lambda n: (n.host, n.uuid))
    if args.json:
        print_json(out, [node_to_api_json(n) for n in nodes])
        return EXIT_OK
    counts: dict[str, int] = {}
    for dataset in listing.datasets:
        if not dataset.deleted:
            counts[dataset.primary] = counts.get(dataset.primary, 0) + 1
    short = short_ids(n.uuid for n in nodes)
    rows = []
    for node in nodes:
        alive = {True: "yes", False: "no", None: "-"}[node.alive]
        if isinstance(node.last_seen, (int, float)):
            seen = seconds_text(node.last_seen) + " ago"
        else:
            seen = node.last_seen or "-"
        rows.append([short[node.uuid], node.host, alive, seen,
                     str(counts.get(node.uuid, 0))])
    headers = ["NODE", "ADDRESS", "ALIVE", "LAST SEEN", "DATASETS"]
    if any(node.zone is not None for node in nodes):
        # Only clusters whose nodes have zones (ebs) show them.
        headers.append("ZONE")
        for row, node in zip(rows, nodes):
            row.append(node.zone or "-")
    out.write(format_table(headers, rows))
    return EXIT_OK


async def _list(client: IControlClient, args: argparse.Namespace, out: IO[str]) -> int:
    listing, states, leases, nodes = await _gather(
        client.list_datasets(), client.state_datasets(), client.list_leases(),
        client.list_nodes())
    datasets = [d for d in listing.datasets if args.all or not d.deleted]
    datasets.sort(key=lambda d: (d.deleted, d.name is None, d.name or "", d.dataset_id))
    states_of: dict[str, list[DatasetReport]] = {}
    for state in states:
        states_of.setdefault(state.dataset_id, []).append(state)
    lease_of = {lease.dataset_id: lease for lease in leases}
    if args.json:
        result = []
        for d in datasets:
            state, path = dataset_state(d, states_of.get(d.dataset_id, []))
            lease = lease_of.get(d.dataset_id)
            if lease is not None:
                lease = lease_to_json(lease, client.seconds())
                del lease["dataset_id"]
            result.append(dict(dataset_to_json(d), state=state, path=path, lease=lease))
        print_json(out, result)
        return EXIT_OK
    short = short_ids(d.dataset_id for d in listing.datasets)
    names = NodeLabels(nodes, [d.primary for d in datasets] + [l.node_uuid for l in leases])
    rows = []
    for d in datasets:
        state, path = dataset_state(d, states_of.get(d.dataset_id, []))
        lease = lease_of.get(d.dataset_id)
        rows.append([
            short[d.dataset_id], d.name or "-",
            "-" if d.maximum_size is None else format_size(d.maximum_size),
            names.label(d.primary), state,
            "-" if lease is None else f"{names.label(lease.node_uuid)} "
                                      f"{seconds_text(lease.remaining(client.seconds()))}",
            path or "-"])
    out.write(format_table(["DATASET", "NAME", "SIZE", "PRIMARY", "STATE", "LEASE", "PATH"],
                           rows))
    return EXIT_OK


def _show_dataset(out: IO[str], args: argparse.Namespace, dataset: Dataset,
                  sentence: str) -> int:
    if args.json:
        print_json(out, dataset_to_json(dataset))
    else:
        out.write(sentence + "\n")
    return EXIT_OK


async def _create(client: IControlClient, args: argparse.Namespace, out: IO[str]) -> int:
    metadata: dict[str, str] = {}
    for pairs in args.metadata:
        metadata.update(pairs)
    if args.name is not None:
        if metadata.get("name", args.name) != args.name:
            raise CLIError(f"--name {args.name!r} and --metadata name={metadata['name']!r} "
                           "disagree; give the name once", EXIT_USAGE)
        metadata["name"] = args.name
    nodes = await client.list_nodes()
    primary = resolve_node(args.node, nodes)
    dataset = await client.create_dataset(primary, maximum_size=args.size,
                                          metadata=metadata or None)
    size = "default size" if dataset.maximum_size is None else \
        format_size(dataset.maximum_size)
    return _show_dataset(out, args, dataset,
                         f"Created dataset {dataset_label(dataset)}, {size}, on node "
                         f"{NodeLabels(nodes, [primary]).label(primary)}.")


async def _move(client: IControlClient, args: argparse.Namespace, out: IO[str]) -> int:
    listing, nodes = await _gather(client.list_datasets(), client.list_nodes())
    dataset_id, before = resolve_dataset(args.dataset, listing.datasets)
    target = resolve_node(args.to, nodes)
    try:
        dataset = await client.move_dataset(dataset_id, target)
    except Conflict as e:
        if e.zones is None or before is None:
            raise
        raise CLIError(f"{e.description}\n{copy_hint(before, target, nodes)}",
                       EXIT_FAILED) from None
    names = NodeLabels(nodes, [target] + ([before.primary] if before else []))
    if before is not None and before.primary == target:
        sentence = (f"Dataset {dataset_label(dataset)} is already on node "
                    f"{names.label(target)}.")
    elif before is not None:
        sentence = (f"Moving dataset {dataset_label(dataset)} from node "
                    f"{names.label(before.primary)} to node {names.label(target)}.")
    else:
        sentence = f"Moving dataset {dataset_label(dataset)} to node {names.label(target)}."
    if not args.wait:
        return _show_dataset(out, args, dataset, sentence)
    if not args.json:
        out.write(sentence + "\n")
    await _wait_mounted(client, dataset_id, target, names, out, args)
    if args.json:
        print_json(out, dataset_to_json(dataset))
    return EXIT_OK


def copy_hint(dataset: Dataset, target: str, nodes: Sequence[Node]) -> str:
    """How to copy ``dataset`` to node ``target`` in another availability zone: no host can
    attach both volumes, so the data streams from a container on one to one on the other."""
    hosts = {n.uuid: n.host for n in nodes}
    name = dataset.name or "NAME"
    size = "" if dataset.maximum_size is None else \
        f" --size {format_size(dataset.maximum_size)}"
    return (f"To copy it: make a dataset in the target's zone and stream the files across "
            f"(stop the containers using {name} first):\n"
            f"  {_PROG} create --node {target}{size} --name {name}-copy\n"
            f"  ssh {hosts.get(dataset.primary, 'SOURCE-NODE')} docker run --rm -v "
            f"{name}:/from --volume-driver=pyflock busybox tar -C /from -cf - . |\n"
            f"    ssh {hosts.get(target, 'TARGET-NODE')} docker run -i --rm -v "
            f"{name}-copy:/to --volume-driver=pyflock busybox tar -C /to -xf -")


def transfer_text(state) -> str:
    """How far a peer-to-peer move of a reported dataset got (" (12.0 of 50.0 MiB sent,
    24%)"), or "" when the node sends none."""
    transfer = state.transfer
    if transfer is None:
        return ""
    done = f"{transfer.bytes_done / 2 ** 20:.1f}"
    if not transfer.bytes_total:
        return f" ({done} MiB sent)"
    percent = 100 * transfer.bytes_done // transfer.bytes_total
    return f" ({done} of {transfer.bytes_total / 2 ** 20:.1f} MiB sent, {percent}%)"


#: How often ``move --wait`` asks the control service where the dataset is.
WAIT_INTERVAL = 0.1


async def _wait_mounted(client: IControlClient, dataset_id: str, target: str,
                        names: "NodeLabels", out: IO[str], args: argparse.Namespace) -> None:
    """Show the dataset's states on every node until it is mounted on ``target`` alone."""
    clock = args.clock
    started = clock.seconds()
    last = None
    while True:
        states = [s for s in await client.state_datasets() if s.dataset_id == dataset_id]
        progress = ", ".join(f"{s.state} on {names.label(s.node_uuid)}{transfer_text(s)}"
                             for s in states) or "not reported by any node yet"
        elapsed = clock.seconds() - started
        if progress != last and not args.json:
            out.write(f"  {elapsed:5.1f}s  {progress}\n")
            last = progress
        if [(s.node_uuid, s.state) for s in states] == [(target, "mounted")]:
            if not args.json:
                path = states[0].path
                out.write(f"Mounted on node {names.label(target)}"
                          f"{' at ' + path if path else ''} after {elapsed:.1f}s.\n")
            return
        if elapsed > args.timeout:
            raise CLIError(f"the move did not finish within {args.timeout:g}s (now: {progress}); "
                           f"the node agents' logs say why. The move goes on: check again with "
                           f"'pyflock list'.", EXIT_FAILED)
        await deferLater(clock, WAIT_INTERVAL, lambda: None)


async def _destroy(client: IControlClient, args: argparse.Namespace, out: IO[str]) -> int:
    listing = await client.list_datasets()
    dataset_id, _ = resolve_dataset(args.dataset, listing.datasets)
    dataset = await client.delete_dataset(dataset_id, purge=args.now)
    if dataset.retained_until is None:
        sentence = f"Deleted dataset {dataset_label(dataset)}; its node removes the data."
    else:
        sentence = (f"Deleted dataset {dataset_label(dataset)}; its data is kept until "
                    f"{utc_text(dataset.retained_until)}: 'pyflock restore "
                    f"{dataset.dataset_id}' brings it back, 'pyflock destroy --now "
                    f"{dataset.dataset_id}' destroys it at once.")
    return _show_dataset(out, args, dataset, sentence)


async def _restore(client: IControlClient, args: argparse.Namespace, out: IO[str]) -> int:
    listing = await client.list_datasets()
    # Among the deleted datasets kept, the latest deleted first when names repeat.
    kept = sorted((d for d in listing.datasets if d.retained_until is not None),
                  key=lambda d: -d.retained_until)
    as_live = [attr.evolve(d, deleted=False, retained_until=None) for d in kept]
    dataset_id, _ = resolve_dataset(args.dataset, as_live)
    dataset = await client.restore_dataset(dataset_id, name=args.name)
    return _show_dataset(out, args, dataset, f"Restored dataset {dataset_label(dataset)}.")


async def _leases_list(client: IControlClient, args: argparse.Namespace,
                       out: IO[str]) -> int:
    leases, listing, nodes = await _gather(client.list_leases(), client.list_datasets(),
                                           client.list_nodes())
    leases = sorted(leases, key=lambda lease: lease.dataset_id)
    if args.json:
        print_json(out, [lease_to_json(lease, client.seconds()) for lease in leases])
        return EXIT_OK
    by_id = {d.dataset_id: d for d in listing.datasets}
    short = short_ids(list(by_id) + [lease.dataset_id for lease in leases])
    names = NodeLabels(nodes, [lease.node_uuid for lease in leases])
    rows = []
    for lease in leases:
        dataset = by_id.get(lease.dataset_id)
        rows.append([short[lease.dataset_id], (dataset and dataset.name) or "-",
                     names.label(lease.node_uuid),
                     "never" if lease.expiration is None
                     else "in " + seconds_text(lease.remaining(client.seconds()))])
    out.write(format_table(["DATASET", "NAME", "NODE", "EXPIRES"], rows))
    return EXIT_OK


def _show_lease(out: IO[str], args: argparse.Namespace, lease: Lease, now: float,
                sentence: str) -> int:
    if args.json:
        print_json(out, lease_to_json(lease, now))
    else:
        out.write(sentence + "\n")
    return EXIT_OK


async def _leases_acquire(client: IControlClient, args: argparse.Namespace,
                          out: IO[str]) -> int:
    listing, nodes = await _gather(client.list_datasets(), client.list_nodes())
    dataset_id, dataset = resolve_dataset(args.dataset, listing.datasets)
    node = resolve_node(args.node, nodes)
    lease = await client.acquire_lease(dataset_id, node, args.expires)
    label = dataset_id if dataset is None else dataset_label(dataset)
    now = client.seconds()
    until = ("with no expiry" if lease.expiration is None
             else f"for {seconds_text(lease.remaining(now))}")
    return _show_lease(out, args, lease, now,
                       f"Node {NodeLabels(nodes, [node]).label(node)} holds the lease on dataset "
                       f"{label} {until}.")


async def _leases_release(client: IControlClient, args: argparse.Namespace,
                          out: IO[str]) -> int:
    listing, nodes = await _gather(client.list_datasets(), client.list_nodes())
    dataset_id, dataset = resolve_dataset(args.dataset, listing.datasets)
    lease = await client.release_lease(dataset_id)
    label = dataset_id if dataset is None else dataset_label(dataset)
    holder = NodeLabels(nodes, [lease.node_uuid]).label(lease.node_uuid)
    return _show_lease(out, args, lease, client.seconds(),
                       f"Released node {holder}'s lease on dataset {label}.")


async def _node_forget(client: IControlClient, args: argparse.Namespace,
                       out: IO[str]) -> int:
    nodes = await client.list_nodes()
    uuid = resolve_node(args.node, nodes)
    label = NodeLabels(nodes, [uuid]).label(uuid)
    node = await client.forget_node(uuid)
    if args.json:
        print_json(out, node_to_api_json(node))
    else:
        seen = (f", last seen {seconds_text(node.last_seen)} ago"
                if isinstance(node.last_seen, (int, float)) else "")
        out.write(f"Forgot dead node {label}{seen}.\n")
    return EXIT_OK


# -- join tokens (issue 10) ------------------------------------------------------------------

async def _token_create(client: IControlClient, args: argparse.Namespace,
                        out: IO[str]) -> int:
    info = await client.create_token(args.ttl, args.uses)
    if args.json:
        print_json(out, info.to_json())
    else:
        # The token alone, so that TOKEN=$(pyflock token create) works in scripts.
        out.write(f"{info.token}\n")
    return EXIT_OK


async def _token_list(client: IControlClient, args: argparse.Namespace,
                      out: IO[str]) -> int:
    tokens = sorted(await client.list_tokens(), key=lambda t: (t.created, t.token_id))
    if args.json:
        print_json(out, [t.to_json() for t in tokens])
        return EXIT_OK
    now = client.seconds()
    rows = [[t.token_id, t.state, f"{t.used}/{t.uses}",
             ("in " + seconds_text(t.expires - now)) if t.expires > now
             else seconds_text(now - t.expires) + " ago"] for t in tokens]
    out.write(format_table(["ID", "STATE", "USED", "EXPIRES"], rows))
    return EXIT_OK


async def _token_revoke(client: IControlClient, args: argparse.Namespace,
                        out: IO[str]) -> int:
    info = await client.revoke_token(args.token_id)
    if args.json:
        print_json(out, info.to_json())
    else:
        out.write(f"Revoked join token {info.token_id} ({info.used} of {info.uses} "
                  f"use(s) made).\n")
    return EXIT_OK


_COMMANDS: dict[tuple[str, Optional[str]], Callable[..., Any]] = {
    ("version", None): _version,
    ("status", None): _status,
    ("list-nodes", None): _list_nodes,
    ("list", None): _list,
    ("create", None): _create,
    ("move", None): _move,
    ("destroy", None): _destroy,
    ("restore", None): _restore,
    ("leases", "list"): _leases_list,
    ("leases", "acquire"): _leases_acquire,
    ("leases", "release"): _leases_release,
    ("node", "forget"): _node_forget,
    ("token", "create"): _token_create,
    ("token", "list"): _token_list,
    ("token", "revoke"): _token_revoke,
}


def _control_error_line(error: ControlError) -> str:
    text = str(error)
    if error.code is not None and error.code >= 500:
        text += f" (HTTP {error.code})"
    return text



async def execute(args: argparse.Namespace,
                  client_factory: Callable[[Settings], IControlClient], stdout: IO[str],
                  stderr: IO[str], env: Mapping[str, str], clock: Any) -> int:
    """Run the command ``args`` names; the exit status, every failure one line on stderr."""
    try:
        command = _COMMANDS[(args.command, getattr(args, "subcommand", None))]
        settings = resolve_settings({
            "control-service": args.control_service, "control-port": args.control_port,
            "certs-path": args.certs_path, "user": args.user}, env)
        client = client_factory(settings)
        args.clock = clock
        try:
            return await command(client, args, stdout)
        except ControlUnreachable as e:
            origin = settings.origins.get("control-service")
            raise CLIError(f"{e} (control service from {origin})", EXIT_UNREACHABLE) from None
    except CLIError as e:
        # The CLI's own messages may run over several lines (a hint below the error);
        # what each line quotes is made visible.
        stderr.write(f"{_PROG}: error: "
                     + "\n".join(visible(line) for line in e.message.split("\n")) + "\n")
        return e.code
    except ControlError as e:
        stderr.write(f"{_PROG}: error: {visible(_control_error_line(e))}\n")
        return EXIT_FAILED
    except Exception as e:
        if env.get("PYFLOCK_DEBUG"):
            stderr.write(traceback.format_exc())
        stderr.write(f"{_PROG}: error: unexpected {type(e).__name__}: {e} (set "
                     "PYFLOCK_DEBUG=1 to see where; please report it)\n")
        return EXIT_FAILED
