"""A real multi-node Ray cluster on this machine: a head and worker nodes, each its own ``ray start``.

    python cluster/local.py up       [--state-dir /tmp/tl-cluster] [--port 6390] [--dashboard-port 8275]
    python cluster/local.py status   [--state-dir ...]
    python cluster/local.py env      [--state-dir ...]   # export lines for the ray CLI and job clients
    python cluster/local.py kill w2  [--state-dir ...]   # SIGKILL one node (fault-tolerance drills)
    python cluster/local.py add --own-disk DIR [--state-dir ...]  # one more node that sees its own DIR
    python cluster/local.py remove x3 [--state-dir ...]  # stop one node and drop it from the record
    python cluster/local.py down     [--state-dir ...]

Why: our users outgrow one machine, and a single-node Ray hides what breaks on a cluster (paths
only one node sees, trials lost with a node, a token the client forgot). Each node gets its own
logical CPUs, a custom resource naming it (``{"node_w1": 1}``) and its own ``--temp-dir``; token
authentication is on (``RAY_AUTH_MODE=token``, a token generated into ``<state-dir>/auth_token``
and given to every node); the dashboard (and its Jobs API) listens on 127.0.0.1 only. Ray 2.60
itself binds its gRPC servers (GCS, raylets, object managers, agents) on all interfaces and turns
a loopback ``--node-ip-address`` into the machine's address; the token guards those.

Every node is started in a new session, and ``<state-dir>/cluster.json`` records its session id,
its temp dir and its processes. ``down`` and ``kill`` stop exactly those processes (the session,
their descendants, and any Ray process whose command line names the node's temp dir), never
``ray stop``, which would stop every Ray on the machine, other people's included.

Only the standard library is imported here: the ``ray`` CLI comes from the same environment as
this interpreter (``<venv>/bin/ray``), and that environment's ``bin`` is put first on the nodes'
PATH so that a job's ``python -m workflows...`` runs in it.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_STATE_DIR = "/tmp/tl-cluster"
DEFAULT_PORT = 6390
DEFAULT_DASHBOARD_PORT = 8275
STATE_FILE = "cluster.json"
HOST = "127.0.0.1"
# A Unix socket path (<temp-dir>/session_<date>_<pid>/sockets/plasma_store) must stay under 108 bytes.
MAX_TEMP_DIR = 40


class ClusterError(Exception):
    """A cluster that cannot be started, found or stopped; the message names what and where."""


# --- processes ---------------------------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, session id) of ``pid``, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    if fields[0] == "Z":
        return None  # a zombie is dead; its parent has not reaped it yet
    return int(fields[1]), int(fields[3])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _is_ray(cmdline: str) -> bool:
    """A Ray process (not, say, someone's ``tail -f`` of a log under the temp dir)."""
    return cmdline.startswith(("ray::", "ray-dashboard-")) or "/site-packages/ray/" in cmdline


def node_processes(node: dict) -> list[int]:
    """Live processes of one node: its session, their descendants, and whatever names its temp dir."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            st = _proc_stat(int(entry.name))
            if st:
                stats[int(entry.name)] = st
    temp_dir = node["temp_dir"].rstrip("/") + "/"
    mine = {pid for pid, (_, sid) in stats.items() if sid == node["sid"]}
    mine |= {pid for pid in stats if temp_dir in (cmd := _cmdline(pid) + " ") and _is_ray(cmd)}
    mine |= {pid for pid in node.get("pids", []) if pid in stats and stats[pid][1] == node["sid"]}
    grew = True
    while grew:  # descendants (a Ray worker renames itself "ray::...", so its command line says nothing)
        more = {pid for pid, (ppid, _) in stats.items() if ppid in mine and pid not in mine}
        mine |= more
        grew = bool(more)
    return sorted(mine)


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop_node(node: dict, grace_s: float = 10.0) -> list[int]:
    """SIGTERM one node's processes, then SIGKILL what is left after ``grace_s``; returns what was signalled."""
    pids = node_processes(node)
    signalled = list(pids)
    if grace_s > 0:
        _signal_all(pids, signal.SIGTERM)
        deadline = time.time() + grace_s
        while pids and time.time() < deadline:
            time.sleep(0.3)
            pids = node_processes(node)
            signalled += [p for p in pids if p not in signalled]
    for _ in range(20):  # SIGKILL until nothing of the node is left (a dying raylet may still spawn)
        pids = node_processes(node)
        if not pids:
            break
        signalled += [p for p in pids if p not in signalled]
        _signal_all(pids, signal.SIGKILL)
        time.sleep(0.3)
    return signalled


# --- state -------------------------------------------------------------------------------------


def state_path(state_dir: str | os.PathLike) -> Path:
    return Path(state_dir) / STATE_FILE


def load_state(state_dir: str | os.PathLike) -> dict:
    """The recorded cluster of ``state_dir``; ClusterError when there is none."""
    p = state_path(state_dir)
    if not p.exists():
        raise ClusterError(f"no local cluster recorded in '{state_dir}' ({p} is missing); start one with `up`")
    return json.loads(p.read_text())


def _save_state(state: dict) -> None:
    p = state_path(state["state_dir"])
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, p)


def auth_env(state: dict, base: dict | None = None) -> dict[str, str]:
    """The environment every node, ray CLI call and job client of this cluster needs: token auth on,
    this cluster's token file (not ~/.ray/auth_token), and the venv first on PATH."""
    env = dict(os.environ if base is None else base)
    env.pop("RAY_AUTH_TOKEN", None)
    env.pop("RAY_ADDRESS", None)
    # a node's CPUs are what `ray start --num-cpus` says: one thread per assigned CPU (tl.runtime.CPUS_PER_CORE_VAR
    # is for the single local Ray a workflow or the tests start, and must not reach these nodes)
    env.pop("TL_CPUS_PER_CORE", None)
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN_PATH"] = state["token_file"]
    env["PATH"] = state["bin_dir"] + os.pathsep + env.get("PATH", "")
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


# --- commands ----------------------------------------------------------------------------------


def _ray_bin() -> str:
    here = Path(sys.executable).parent / "ray"
    if not here.exists():
        raise ClusterError(f"the ray CLI is not beside this Python ({here}); run this script with the project's "
                           f".venv/bin/python")
    return str(here)


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Ray's servers do: TIME_WAIT is no clash
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _ephemeral_range() -> tuple[int, int] | None:
    """The kernel's range for the local ends of outgoing connections: a server port inside it can be
    taken at any moment by some process's connection (Ray's own clients open many), so a node bound
    there fails to start now and then ("timed out during startup"), never reliably."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return None


def _check_ports(extra: list[int], nodes: list[dict[str, int]]) -> None:
    """Refuse the ports of ``nodes`` (``_node_ports``; servers and worker ranges) and ``extra`` servers if any lies
    in the ephemeral range, or a server's is already bound."""
    servers = extra + [q for n in nodes for k, q in n.items() if not k.endswith("worker-port")]
    every = servers + [q for n in nodes for q in range(n["min-worker-port"], n["max-worker-port"] + 1)]
    eph = _ephemeral_range()
    if eph is not None:
        inside = sorted(q for q in every if eph[0] <= q <= eph[1])
        if inside:
            raise ClusterError(f"port(s) {inside[0]}..{inside[-1]} lie in the kernel's ephemeral range "
                               f"{eph[0]}-{eph[1]} (/proc/sys/net/ipv4/ip_local_port_range), where outgoing "
                               f"connections take ports at random and a node may fail to start; choose --port and "
                               f"--dashboard-port so that every node's ports (--port to --port+100*(workers+2)) "
                               f"stay below {eph[0]}")
    busy = [q for q in servers if not _port_free(q)]
    if busy:
        raise ClusterError(f"port(s) {busy} are in use; choose another --port / --dashboard-port "
                           f"(another cluster may be running)")


def _node_ports(base: int, index: int) -> dict[str, int]:
    """Fixed ports for node ``index``: the block ``base + 100*(index+1)`` to ``+99`` (its servers, then its
    workers), so clusters whose ``--port`` differ by 1000 or more never collide."""
    b = base + 100 * (index + 1)
    return {"node-manager-port": b, "object-manager-port": b + 1, "dashboard-agent-listen-port": b + 2,
            "dashboard-agent-grpc-port": b + 3, "runtime-env-agent-port": b + 4, "metrics-export-port": b + 5,
            "min-worker-port": b + 10, "max-worker-port": b + 99}


def _start_node(state: dict, node: dict, args: list[str], log, attempts: int = 3, prefix: list[str] = ()) -> None:
    """``ray start`` in a new session (so the node's processes can be found and stopped later).
    Ray gives a raylet 30 s to register; on a loaded machine it can miss that, so a node that
    fails is stopped and started again, up to ``attempts`` times."""
    cmd = [*prefix, _ray_bin(), "start", *args, "--node-ip-address", HOST, "--num-cpus", str(node["num_cpus"]),
           "--resources", json.dumps(node["resources"]), "--temp-dir", node["temp_dir"],
           "--object-store-memory", str(state["object_store_mb"] * 1024 * 1024), "--disable-usage-stats"]
    for k, v in node["ports"].items():
        cmd += [f"--{k}", str(v)]
    Path(node["temp_dir"]).mkdir(parents=True, exist_ok=True)
    out = Path(state["state_dir"]) / f"{node['name']}.start.log"
    state["nodes"].append(node)
    for attempt in range(1, attempts + 1):
        t0 = time.time()
        with open(out, "w") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=auth_env(state),
                                    start_new_session=True)
            node["sid"] = proc.pid
            _save_state(state)  # recorded before it can fail, so `down` finds a half-started node too
            rc = proc.wait(timeout=300)
        node["pids"] = node_processes(node)
        node["node_id"] = _node_id(node["pids"])
        _save_state(state)
        if rc == 0:
            log(f"  {node['name']}: {node['num_cpus']} CPUs, resources {node['resources']}, temp dir "
                f"{node['temp_dir']}, {len(node['pids'])} processes ({time.time() - t0:.1f} s)")
            return
        tail = out.read_text()[-2000:]
        if attempt == attempts:
            raise ClusterError(f"`ray start` for node '{node['name']}' exited with {rc} {attempts} times; its last "
                               f"output is in {out}:\n{tail}")
        log(f"  {node['name']}: `ray start` exited with {rc} ({tail.strip().splitlines()[-1][:200]}); "
            f"stopping it and trying again")
        stop_node(node)


def _node_id(pids: list[int]) -> str | None:
    """The Ray node id, read from the raylet's command line (the rows of a comparison record it)."""
    for pid in pids:
        for arg in _cmdline(pid).split():
            if arg.startswith("--node_id="):
                return arg.split("=", 1)[1]
    return None


def ray_status(state: dict, timeout: float = 60) -> str:
    """``ray status`` of this cluster (it carries the token)."""
    r = subprocess.run([_ray_bin(), "status", "--address", state["gcs_address"]], capture_output=True, text=True,
                       check=False, env=auth_env(state), timeout=timeout)
    if r.returncode != 0:
        raise ClusterError(f"`ray status --address {state['gcs_address']}` failed ({r.returncode}): "
                           f"{(r.stderr or r.stdout).strip()[-1500:]}")
    return r.stdout


def _active_nodes(status_text: str) -> int:
    lines = status_text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Active:") + 1
    except StopIteration:
        return 0
    n = 0
    for line in lines[start:]:
        if not line.strip().startswith("1 node_"):
            break
        n += 1
    return n


def up(state_dir: str, port: int, dashboard_port: int, head_cpus: int, worker_cpus: int, workers: int,
       object_store_mb: int, dashboard_host: str = HOST, log=print) -> dict:
    """Start the head and ``workers`` worker nodes; returns the recorded state."""
    sd = Path(state_dir).resolve()
    if state_path(sd).exists():
        raise ClusterError(f"a local cluster is already recorded in '{sd}'; run `down --state-dir {sd}` first")
    if len(str(sd)) > MAX_TEMP_DIR:
        raise ClusterError(f"--state-dir '{sd}' is {len(str(sd))} characters; Ray's socket paths under it would pass "
                           f"the 107-byte Unix limit; use at most {MAX_TEMP_DIR} (e.g. /tmp/tl-cluster)")
    _check_ports([port, port + 1, dashboard_port], [_node_ports(port, i) for i in range(workers + 1)])
    sd.mkdir(parents=True, exist_ok=True)
    token_file = sd / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    storage = sd / "shared"
    storage.mkdir(exist_ok=True)
    state = {"state_dir": str(sd), "gcs_address": f"{HOST}:{port}",
             "dashboard_url": f"http://{HOST}:{dashboard_port}" if dashboard_host in (HOST, "localhost")
             else f"http://{dashboard_host}:{dashboard_port}",
             "token_file": str(token_file), "storage": str(storage), "bin_dir": str(Path(sys.executable).parent),
             "object_store_mb": object_store_mb, "started": time.time(), "nodes": []}
    _save_state(state)
    log(f"starting a local Ray cluster in {sd} (token auth on; GCS {state['gcs_address']}, "
        f"dashboard {state['dashboard_url']})")
    try:
        head = {"name": "head", "num_cpus": head_cpus, "resources": {"node_head": 1}, "temp_dir": str(sd / "head"),
                "ports": _node_ports(port, 0)}
        _start_node(state, head, ["--head", "--port", str(port), "--dashboard-host", dashboard_host,
                                  "--dashboard-port", str(dashboard_port), "--ray-client-server-port", str(port + 1),
                                  "--include-dashboard", "true"], log)
        for i in range(1, workers + 1):
            w = {"name": f"w{i}", "num_cpus": worker_cpus, "resources": {f"node_w{i}": 1},
                 "temp_dir": str(sd / f"w{i}"), "ports": _node_ports(port, i)}
            _start_node(state, w, ["--address", state["gcs_address"]], log)
        deadline = time.time() + 60
        while True:
            status = ray_status(state)
            if _active_nodes(status) >= workers + 1:
                break
            if time.time() > deadline:
                raise ClusterError(f"only {_active_nodes(status)} of {workers + 1} nodes joined within 60 s:\n{status}")
            time.sleep(1)
    except BaseException:
        log("start-up failed; stopping what was started")
        down(str(sd), log=log)
        raise
    for node in state["nodes"]:
        node["pids"] = node_processes(node)
    _save_state(state)
    log(f"up: {len(state['nodes'])} nodes. Use it with:\n{env_lines(state)}\n"
        f"  shared storage for --storage and --output: {storage}")
    return state


def env_lines(state: dict) -> str:
    """Shell lines that point the ray CLI and job clients at this cluster, token included."""
    return "\n".join(["export RAY_AUTH_MODE=token", f"export RAY_AUTH_TOKEN_PATH={state['token_file']}",
                      f"export RAY_ADDRESS={state['gcs_address']}",
                      f"export RAY_API_SERVER_ADDRESS={state['dashboard_url']}"])


def status(state_dir: str, log=print) -> int:
    state = load_state(state_dir)
    alive = 0
    for node in state["nodes"]:
        pids = node_processes(node)
        alive += bool(pids)
        log(f"  {node['name']}: {'up' if pids else 'DOWN'}, {len(pids)} processes, {node['num_cpus']} CPUs, "
            f"node id {node.get('node_id')}, temp dir {node['temp_dir']}")
    log(f"dashboard {state['dashboard_url']}, GCS {state['gcs_address']}, token {state['token_file']}, "
        f"shared storage {state['storage']}")
    if alive:
        try:
            log(ray_status(state, timeout=30))
        except (ClusterError, subprocess.TimeoutExpired) as exc:
            log(f"ray status: {exc}")
    return 0 if alive == len(state["nodes"]) else 1


def kill(state_dir: str, name: str, log=print) -> list[int]:
    """SIGKILL every process of node ``name`` at once: what a crashed machine looks like to Ray."""
    state = load_state(state_dir)
    node = next((n for n in state["nodes"] if n["name"] == name), None)
    if node is None:
        raise ClusterError(f"no node '{name}' in the cluster of '{state_dir}' (nodes: "
                           f"{', '.join(n['name'] for n in state['nodes'])})")
    pids = stop_node(node, grace_s=0)
    log(f"killed node {name}: {len(pids)} processes")
    return pids


def add(state_dir: str, own_disk: str, num_cpus: int = 1, log=print) -> dict:
    """One more worker node whose ``own_disk`` folder is its own (an empty tmpfs mounted over it in
    the node's own mount namespace: ``unshare -m``, as root): what a folder on a node's local disk
    looks like on a real cluster, where the driver's files under that path are not there. Returns
    the node's record (named ``x<index>``)."""
    state = load_state(state_dir)
    folder = Path(own_disk).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    index = len(state["nodes"])
    name = f"x{index}"
    ports = _node_ports(int(state["gcs_address"].rsplit(":", 1)[1]), index)
    _check_ports([], [ports])
    node = {"name": name, "num_cpus": num_cpus, "resources": {f"node_{name}": 1},
            "temp_dir": str(Path(state["state_dir"]) / name), "own_disk": str(folder),
            "ports": ports}
    prefix = ["unshare", "-m", "--propagation", "private", "sh", "-c",
              f'mount -t tmpfs tl-own-disk "{folder}" && exec "$0" "$@"']
    _start_node(state, node, ["--address", state["gcs_address"]], log, prefix=prefix)
    return node


def remove(state_dir: str, name: str, log=print) -> None:
    """Stop node ``name`` (its processes, as ``down`` does) and drop it from the record."""
    state = load_state(state_dir)
    node = next((n for n in state["nodes"] if n["name"] == name), None)
    if node is None:
        raise ClusterError(f"no node '{name}' in the cluster of '{state_dir}'")
    pids = stop_node(node)
    state["nodes"] = [n for n in state["nodes"] if n["name"] != name]
    _save_state(state)
    log(f"removed node {name}: stopped {len(pids)} processes")


def down(state_dir: str, log=print) -> int:
    """Stop the recorded nodes, workers first, and remove the record; returns the processes left (0)."""
    state = load_state(state_dir)
    for node in reversed(state["nodes"]):
        pids = stop_node(node)
        log(f"  {node['name']}: stopped {len(pids)} processes")
    left = sum(len(node_processes(n)) for n in state["nodes"])
    if left:
        raise ClusterError(f"{left} processes of the cluster in '{state_dir}' are still alive")
    state_path(state["state_dir"]).unlink()
    log(f"down: no process of the cluster in {state['state_dir']} is left (logs stay under its temp dirs)")
    return left


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python cluster/local.py", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["up", "down", "status", "env", "kill", "add", "remove"])
    p.add_argument("node", nargs="?", help="for `kill` and `remove`: the node's name (head, w1, w2, ...)")
    p.add_argument("--own-disk", metavar="DIR", help="for `add`: a folder the new node sees as its own, empty")
    p.add_argument("--state-dir", default=os.environ.get("TL_CLUSTER_DIR", DEFAULT_STATE_DIR),
                   help=f"where the token, the record, node temp dirs and shared storage go (default "
                        f"{DEFAULT_STATE_DIR}; short: Unix socket paths live under it)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"GCS port of the head (default {DEFAULT_PORT}); port+1 is its Ray client server, the nodes' "
                        f"own ports are port+100 to port+100*(workers+2); space two clusters 1000 apart")
    p.add_argument("--dashboard-port", type=int, default=DEFAULT_DASHBOARD_PORT,
                   help=f"dashboard and Jobs API port (default {DEFAULT_DASHBOARD_PORT})")
    p.add_argument("--dashboard-host", default=HOST,
                   help="address the dashboard binds to (default 127.0.0.1: nothing beyond loopback)")
    p.add_argument("--head-cpus", type=int, default=1, help="logical CPUs of the head (default 1)")
    p.add_argument("--worker-cpus", type=int, default=2, help="logical CPUs of each worker node (default 2)")
    p.add_argument("--workers", type=int, default=2, help="worker nodes (default 2)")
    p.add_argument("--object-store-mb", type=int, default=400, help="object store per node, MiB (default 400)")
    a = p.parse_args(argv)
    try:
        if a.command == "up":
            up(a.state_dir, a.port, a.dashboard_port, a.head_cpus, a.worker_cpus, a.workers, a.object_store_mb,
               a.dashboard_host)
        elif a.command == "down":
            down(a.state_dir)
        elif a.command == "status":
            return status(a.state_dir)
        elif a.command == "env":
            print(env_lines(load_state(a.state_dir)))
        elif a.command == "kill":
            if not a.node:
                p.error("kill needs a node name, e.g. `kill w2`")
            kill(a.state_dir, a.node)
        elif a.command == "add":
            if not a.own_disk:
                p.error("add needs --own-disk DIR")
            add(a.state_dir, a.own_disk)
        elif a.command == "remove":
            if not a.node:
                p.error("remove needs a node name")
            remove(a.state_dir, a.node)
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
