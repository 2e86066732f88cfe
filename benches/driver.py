#!/usr/bin/env python3
"""Side-by-side benchmark of Porthole against nginx, HAProxy, Squid, tinyproxy
and socat on this machine (issue 7, figures P1-P6, with rows through the shim),
and of Porthole's uplink against rathole (issue 5, figures U1-U2, `--only U1,U2`).
Run through benches/run.sh.

Everything listens on 127.0.0.1 ports chosen free at run time; every process
this script starts runs in its own session and is stopped on exit. Results are
measured now: nothing is copied from an earlier run.
"""

import argparse
import atexit
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T0 = time.monotonic()
PROCS = []  # (name, Popen)


def log(msg):
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


# ------------------------------------------------------------------ processes


def stop_all():
    for name, p in reversed(PROCS):
        stop(p)
    PROCS.clear()


def stop(p):
    if p.poll() is not None:
        return
    try:
        os.killpg(p.pid, signal.SIGTERM)  # its own session: the process and its children
    except ProcessLookupError:
        return
    try:
        p.wait(timeout=5)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(timeout=5)


def on_signal(signum, _frame):
    stop_all()
    sys.exit(128 + signum)


def start(name, cmd, logdir, env=None):
    out = open(os.path.join(logdir, f"{name}.log"), "wb")
    full_env = dict(os.environ)
    full_env.update(env or {})
    p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         env=full_env, start_new_session=True)
    PROCS.append((name, p))
    return p


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, name, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{name} did not listen on {port} within {timeout}s")


def run(cmd, timeout, env=None):
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)


# ------------------------------------------------------------------ setup

TOOLS = {"nginx": "nginx", "haproxy": "haproxy", "squid": "squid", "tinyproxy": "tinyproxy",
         "socat": "socat", "wrk": "wrk"}


def which(cmd):
    return shutil.which(cmd) or next((p for p in (f"/usr/sbin/{cmd}", f"/usr/bin/{cmd}")
                                      if os.access(p, os.X_OK)), None)


def install_missing():
    missing = [pkg for cmd, pkg in TOOLS.items() if not which(cmd)]
    if not missing:
        return
    log(f"installing from Debian's packages: {' '.join(missing)}")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    # The service scripts must not start system-wide copies: the harness runs its own.
    env = {"DEBIAN_FRONTEND": "noninteractive", "RUNLEVEL": "1"}
    subprocess.run(sudo + ["apt-get", "update", "-qq"], check=True, timeout=600)
    subprocess.run(sudo + ["apt-get", "install", "-y", "-qq"] + missing, check=True, timeout=900,
                   env={**os.environ, **env})


def binaries(target_dir):
    """The release binaries the run uses: relay, tunnel load tool, shim."""
    return (os.path.join(target_dir, "release", "porthole-relay"),
            os.path.join(target_dir, "release", "examples", "tunnel_load"),
            os.path.join(target_dir, "release", "porthole-shim"))


def build(target_dir):
    log("building porthole-relay, porthole-shim and the tunnel load tool (release)")
    for args in (["-p", "porthole-relay", "--bin", "porthole-relay"],
                 ["-p", "porthole-shim", "--bin", "porthole-shim"],
                 ["-p", "porthole-suite", "--example", "tunnel_load"]):
        subprocess.run(["cargo", "build", "--release", "--locked", *args], cwd=ROOT, check=True,
                       timeout=1800)
    return binaries(target_dir)


# rathole (the uplink figures' peer) is not in Debian. Its published lock file
# pins time 0.3.29, which no longer compiles with rustc >= 1.80 (E0282 in
# time's format_description), so `cargo install rathole --locked` fails; it is
# installed unlocked, with only its server and client (no TLS, noise or
# websocket transports: the bench uses plain TCP, as Porthole's uplink does here).
RATHOLE_INSTALL = ["cargo", "install", "rathole", "--no-default-features", "--features", "server,client"]


def find_rathole():
    return shutil.which("rathole") or next(
        (p for p in [os.path.expanduser("~/.cargo/bin/rathole")] if os.access(p, os.X_OK)), None)


def install_rathole():
    path = find_rathole()
    if path:
        return path
    log(f"installing rathole: {' '.join(RATHOLE_INSTALL)} (several minutes)")
    r = subprocess.run(RATHOLE_INSTALL, capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"`{' '.join(RATHOLE_INSTALL)}` failed: {r.stderr.strip()[-400:]}")
    return find_rathole()


def first_line(cmd):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        text = (r.stdout + r.stderr).strip()
        return text.splitlines()[0] if text else "?"
    except Exception as e:  # noqa: BLE001 - a version string is informative only
        return f"? ({e})"


def versions(relay_bin):
    commit = first_line(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"])
    dirty = run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"], 10).stdout
    return {
        "porthole": f"{first_line([relay_bin, '--version'])} (commit {commit}{', modified' if dirty.strip() else ''}; {first_line(['rustc', '--version'])})",
        "nginx": first_line(["nginx", "-v"]),
        "haproxy": first_line(["haproxy", "-v"]),
        "squid": first_line(["squid", "-v"]),
        "tinyproxy": first_line(["tinyproxy", "-v"]),
        "socat": next((l for l in run(["socat", "-V"], 10).stdout.splitlines() if "socat version" in l), "?"),
        "wrk": first_line(["wrk", "-v"]),
    }


def machine():
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem = f.readline().split()[1]
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "kernel": os.uname().release,
        "memory": f"{int(mem) // 1024 // 1024} GiB",
        "load at start": open("/proc/loadavg").read().split()[0:3],
    }


# ------------------------------------------------------------------ configs


def nginx_backend_conf(d, port):
    www = os.path.join(d, "www")
    os.makedirs(www, exist_ok=True)
    with open(os.path.join(www, "1k"), "wb") as f:
        f.write(b"x" * 1024)
    with open(os.path.join(www, "1m"), "wb") as f:
        f.write(b"y" * (1024 * 1024))
    return f"""
user root;
worker_processes 1;
daemon off;
pid {d}/backend.pid;
error_log {d}/backend-error.log warn;
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {d}/backend-body;
    proxy_temp_path {d}/backend-proxy;
    default_type application/octet-stream;
    sendfile on;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {www};
        location / {{ }}
    }}
}}
"""


def nginx_proxy_conf(d, port, backend):
    return f"""
user root;
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {d}/nginx-body;
    proxy_temp_path {d}/nginx-proxy;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    upstream backend {{
        server 127.0.0.1:{backend};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # No disk: relay through memory buffers only (nothing cached).
            proxy_max_temp_file_size 0;
        }}
    }}
}}
"""


def haproxy_conf(http_port, backend, tcp_port, sink):
    http = f"""
frontend fe_http
    mode http
    bind 127.0.0.1:{http_port}
    default_backend be_http
backend be_http
    mode http
    http-reuse always
    server s1 127.0.0.1:{backend}
""" if http_port else ""
    return f"""
global
    nbthread 1
    maxconn 8000
defaults
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout tunnel 300s
    timeout http-keep-alive 300s
{http}
frontend fe_tcp
    mode tcp
    bind 127.0.0.1:{tcp_port}
    default_backend be_tcp
backend be_tcp
    mode tcp
    server s1 127.0.0.1:{sink}
"""


def squid_conf(d, port):
    return f"""
http_port 127.0.0.1:{port}
acl bench src 127.0.0.1/32
http_access allow bench
http_access deny all
# No caching: nothing stored in memory or on disk.
cache deny all
cache_mem 0 MB
access_log none
cache_store_log none
cache_log {d}/squid-{port}-cache.log
pid_filename {d}/squid-{port}.pid
coredump_dir {d}
netdb_filename none
max_filedescriptors 16384
shutdown_lifetime 0 seconds
client_persistent_connections on
server_persistent_connections on
"""


def tinyproxy_conf(d, port):
    return f"""
Port {port}
Listen 127.0.0.1
Timeout 600
MaxClients 8000
Allow 127.0.0.1
LogLevel Critical
LogFile "{d}/tinyproxy-{port}.log"
PidFile "{d}/tinyproxy-{port}.pid"
"""


def porthole_conf(port, allowed_ports, host="127.0.0.1", name="porthole-bench", admin="", extra=""):
    """A relay on `port` with one route, `host` to 127.0.0.1 on `allowed_ports`
    (none when empty), the admin listener on `admin` ("" = off), and `extra` TOML."""
    ports = ", ".join(str(p) for p in allowed_ports)
    route = f"""
[[route]]
host = "{host}"
to = "127.0.0.1"
ports = [{ports}]
""" if allowed_ports else ""
    return f"""
[relay]
listen = "127.0.0.1:{port}"
name = "{name}"
admin_listen = "{admin}"
{route}
[limits]
max_connections = 20000
max_connections_per_client = 20000
{extra}
"""


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return path


# ------------------------------------------------------------------ targets


class Env:
    """Where the run keeps its files, its binaries and the shared backend and sink."""

    def __init__(self, d, relay_bin, load_bin, shim_bin=None):
        self.d, self.relay_bin, self.load_bin, self.shim_bin = d, relay_bin, load_bin, shim_bin
        self.relay_port = None  # the default-runtime Porthole the shim links to
        self.backend = None
        self.sink = None
        self.one_worker = None  # (args, env, how) for the one-worker Porthole
        self.access_log_how = "not measured"


def one_worker_mode(relay_bin):
    """How to pin Porthole to one worker thread: a flag if the binary has one,
    else the `relay.workers` key (environment override) where `check` accepts it,
    else tokio's own TOKIO_WORKER_THREADS (honoured by the default runtime builder)."""
    help_text = run([relay_bin, "--help"], 10).stdout
    m = re.search(r"--(worker[-_]threads|workers|threads)\b", help_text)
    if m:
        return ([f"--{m.group(1)}", "1"], {}, f"`--{m.group(1)} 1`")
    tokio_env = {"TOKIO_WORKER_THREADS": "1"}
    keyed = {"PORTHOLE__RELAY__WORKERS": "1", **tokio_env}
    if run([relay_bin, "check"], 10, env=keyed).returncode == 0:
        return ([], keyed,
                "`PORTHOLE__RELAY__WORKERS=1` (`relay.workers = 1`: one connection worker) "
                "and `TOKIO_WORKER_THREADS=1` (the runtime of the admin listener and signals)")
    return ([], tokio_env,
            "`TOKIO_WORKER_THREADS=1` (the binary has no worker-thread option; tokio's default "
            "runtime builder reads this variable)")


def runtime_workers(pid):
    """Threads that serve connections: Porthole's own workers (`relay.workers`)
    where it has them, else the tokio runtime's worker threads."""
    names = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                names.append(f.read().strip())
    except OSError:
        return -1
    own = sum(1 for n in names if n.startswith("porthole-worke"))
    if own:
        return own
    # The name changed across tokio versions.
    return sum(1 for n in names if n.startswith(("tokio-runtime-w", "tokio-rt-worker")))


def start_porthole(env, name, variant, allowed_ports, access_log=False):
    port = free_port()
    path = os.path.join(env.d, f"{name}-{port}.toml")
    text = porthole_conf(port, allowed_ports)
    level = "warn"
    if access_log:
        # The access-log file of `[log] access` where the relay has it, else the
        # `porthole::access` tracing lines at info level, written to a file.
        with_file = text + f'\n[log]\naccess = "{env.d}/access-{port}.log"\n'
        write(path, with_file)
        if run([env.relay_bin, "check", "--config", path], 20).returncode == 0:
            text = with_file
            env.access_log_how = "`[log] access = FILE`"
        else:
            level = "info"
            env.access_log_how = "RUST_LOG=info, standard error to a file"
    conf = write(path, text)
    args, extra, _ = env.one_worker if variant == "1w" else ([], {}, "")
    e = {"RUST_LOG": level, **extra}
    p = start(f"{name}-{port}", [env.relay_bin, "--config", conf, *args], env.d, e)
    wait_port(port, p, name)
    return port, p


def start_peer(env, kind, http=True, tcp=True):
    """Starts one peer; returns {'http': port or None, 'tcp': port or None, 'proc': Popen}."""
    d, backend, sink = env.d, env.backend, env.sink
    if kind == "nginx":
        port = free_port()
        conf = write(os.path.join(d, "nginx.conf"), nginx_proxy_conf(d, port, backend))
        p = start("nginx", ["nginx", "-c", conf, "-p", d, "-e", f"{d}/nginx-error.log"], d)
        wait_port(port, p, kind)
        return {"http": port, "tcp": None, "proc": p}
    if kind == "haproxy":
        hp, tp = (free_port() if http else None), free_port()
        conf = write(os.path.join(d, f"haproxy-{tp}.cfg"), haproxy_conf(hp, backend, tp, sink))
        p = start(f"haproxy-{tp}", ["haproxy", "-db", "-f", conf], d)
        wait_port(tp, p, kind)
        if hp:
            wait_port(hp, p, kind)
        return {"http": hp, "tcp": tp, "proc": p}
    if kind == "squid":
        port = free_port()
        conf = write(os.path.join(d, f"squid-{port}.conf"), squid_conf(d, port))
        # -N: no daemon and no SMP kids: one process does everything.
        p = start(f"squid-{port}", ["squid", "-N", "-f", conf], d)
        wait_port(port, p, kind, timeout=30)
        return {"http": port, "tcp": port, "proc": p}
    if kind == "tinyproxy":
        port = free_port()
        conf = write(os.path.join(d, f"tinyproxy-{port}.conf"), tinyproxy_conf(d, port))
        p = start(f"tinyproxy-{port}", ["tinyproxy", "-d", "-c", conf], d)
        wait_port(port, p, kind)
        return {"http": port, "tcp": port, "proc": p}
    if kind == "socat":
        port = free_port()
        p = start("socat", ["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,backlog=4096",
                            f"TCP:127.0.0.1:{sink}"], d)
        wait_port(port, p, kind)
        return {"http": None, "tcp": port, "proc": p}
    if kind in ("porthole", "porthole-1w", "porthole-log"):
        variant = "1w" if kind == "porthole-1w" else "mt"
        port, p = start_porthole(env, kind, variant, [backend, sink], kind == "porthole-log")
        if kind == "porthole":
            env.relay_port = port
        return {"http": port, "tcp": port, "proc": p}
    if kind == "shim":
        # The shim as a local system proxy: every request and every CONNECT
        # becomes one stream of its single HTTP/2 link to the default Porthole.
        if not env.relay_port:
            raise RuntimeError("the default-runtime Porthole it links to did not start")
        port = free_port()
        conf = write(os.path.join(d, f"shim-{port}.toml"),
                     f'relay = "127.0.0.1:{env.relay_port}"\nrelay_name = "porthole-bench"\n'
                     f'listen = "127.0.0.1:{port}"\n')
        p = start(f"shim-{port}", [env.shim_bin, "--config", conf], d, {"RUST_LOG": "warn"})
        wait_port(port, p, kind)
        return {"http": port, "tcp": port, "proc": p}
    raise ValueError(kind)


# How each HTTP row sends its requests: reverse proxies get origin form, forward
# proxies absolute form (the setup: nginx/HAProxy are reverse proxies).
HTTP_ROWS = [
    ("direct", "direct to backend (nginx, 1 worker)", "origin"),
    ("nginx", "nginx reverse proxy (1 worker, upstream keepalive)", "origin"),
    ("haproxy", "HAProxy http mode (1 thread, http-reuse always)", "origin"),
    ("squid", "Squid forward, absolute-URI (no cache)", "absolute"),
    ("tinyproxy", "tinyproxy forward, absolute-URI", "absolute"),
    ("porthole", "Porthole, absolute-URI (default runtime)", "absolute"),
    ("porthole-1w", "Porthole, absolute-URI (1 worker thread)", "absolute"),
    ("porthole-log", "Porthole, default runtime, access log on (to a file)", "absolute"),
    ("shim", "Porthole through the shim (one HTTP/2 link to the default-runtime relay)", "absolute"),
]
# Rows of P3 (the shim is a row of P1/P2 and P4 only: issue 7's "through the shim").
P3_SKIP = ("porthole-log", "shim")
TUNNEL_ROWS = [
    ("direct", "direct loopback (client to sink)"),
    ("socat", "socat (fork, default 8 KiB buffer)"),
    ("haproxy", "HAProxy tcp mode (1 thread)"),
    ("squid", "Squid CONNECT"),
    ("tinyproxy", "tinyproxy CONNECT"),
    ("porthole", "Porthole CONNECT (default runtime)"),
    ("porthole-1w", "Porthole CONNECT (1 worker thread)"),
    ("shim", "Porthole CONNECT through the shim (HTTP/2 CONNECT streams on one link)"),
]
IDLE_ROWS = ["haproxy", "squid", "tinyproxy", "porthole", "porthole-1w"]
SETUP_ROWS = [
    ("plain", "client ceiling: plain TCP open + close to the sink"),
    ("direct", "client ceiling: CONNECT answered by the sink itself"),
    ("haproxy", "HAProxy tcp mode (CONNECT answered by the sink)"),
    ("squid", "Squid CONNECT"),
    ("tinyproxy", "tinyproxy CONNECT"),
    ("porthole", "Porthole CONNECT (default runtime)"),
    ("porthole-1w", "Porthole CONNECT (1 worker thread)"),
]
PORTHOLES = ["porthole", "porthole-1w"]
LABELS = {k: v for k, v, *_ in HTTP_ROWS + TUNNEL_ROWS + SETUP_ROWS}


# ------------------------------------------------------------------ measurements

UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def wrk(env, port, form, path, secs, lua_dir, host="127.0.0.1"):
    """wrk against `port`; absolute form names `host`:backend (a route or an uplinked name)."""
    url = f"http://127.0.0.1:{port}{path}"
    cmd = ["wrk", "-t1", "-c50", f"-d{secs}s", "--latency"]
    if form == "absolute":
        backend = f"{host}:{env.backend}"
        script = os.path.join(lua_dir, f"abs-{host}{path.replace('/', '-')}.lua")
        write(script, f'wrk.path = "http://{backend}{path}"\nwrk.headers["Host"] = "{backend}"\n')
        cmd += ["-s", script]
    r = run(cmd + [url], secs + 30)
    out = r.stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        raise RuntimeError(f"wrk printed no rate: {out[-400:]} {r.stderr[-400:]}")
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
    errors = ""
    se = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if se:
        errors = ", ".join(f"{n} {k}" for k, n in zip(("connect", "read", "write", "timeout"), se.groups())
                           if n != "0")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    bad = int(non2xx.group(1)) if non2xx else 0
    total = re.search(r"(\d+) requests in", out)
    return {"rps": float(m.group(1)), "requests": int(total.group(1)) if total else None,
            "p99_ms": float(p99.group(1)) * UNIT[p99.group(2)] if p99 else None,
            "socket_errors": errors, "non_2xx": bad}


def load_tool(env, args, timeout):
    r = run([env.load_bin, *args], timeout)
    line = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    if r.returncode != 0 or not line.startswith("{"):
        raise RuntimeError(f"tunnel_load {' '.join(args)}: {r.stderr.strip()[-300:]}")
    return json.loads(line)


def check_http(port, form, backend, host="127.0.0.1"):
    """One request, to make sure a row relays a 200 with the full body before it is measured."""
    path = "/1k"
    target = f"http://{host}:{backend}{path}" if form == "absolute" else path
    req = f"GET {target} HTTP/1.1\r\nHost: {host}:{backend}\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(req.encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b"\r\n")[0].decode(errors="replace")
    if " 200 " not in status + " ":
        raise RuntimeError(f"answered `{status}`")
    if b"x" * 1024 not in body:
        raise RuntimeError("the 1 KiB body did not come through")


# ------------------------------------------------------------------ uplink figures (issue 5)

UPLINK_NAME = "svc.bench"  # the name the inside relay offers through the outside one
UPLINK_ID = "bench"
U_ROWS = [
    ("direct", "direct (no relay): client to sink / wrk to the backend"),
    ("porthole", "Porthole, one relay, no uplink (for scale)"),
    ("uplink", "Porthole uplink: client → outside relay O → data connection → inside relay I"),
    ("rathole", "rathole: client → rathole server → rathole client (plain TCP forward)"),
]
U_REFS = [("uplink", "Porthole uplink")]


def start_uplink(env):
    """The outside relay O (`[[accept_uplink]]`) and the inside relay I (`[uplink]`
    offering UPLINK_NAME, routed to 127.0.0.1 on the backend's and the sink's ports).
    Returns (O's port, O's admin port); waits until O relays a request to the name."""
    d = env.d
    secret_file = write(os.path.join(d, "uplink.secret"), os.urandom(16).hex() + "\n")
    with open(secret_file) as f:
        r = subprocess.run([env.relay_bin, "passwd", UPLINK_ID], stdin=f, capture_output=True, text=True,
                           timeout=60)
    if r.returncode != 0 or not r.stdout.strip():
        raise RuntimeError(f"porthole-relay passwd failed: {r.stderr.strip()[-200:]}")
    o_port, o_admin = free_port(), free_port()
    accept = f"""
[[accept_uplink]]
id = "{UPLINK_ID}"
secret_hash = "{r.stdout.strip()}"
may_offer = ["{UPLINK_NAME}"]
session_timeout = "10s"
"""
    o_conf = write(os.path.join(d, "uplink-outside.toml"),
                   porthole_conf(o_port, [], name="porthole-outside", admin=f"127.0.0.1:{o_admin}",
                                 extra=accept))
    p = start("uplink-outside", [env.relay_bin, "--config", o_conf], d, {"RUST_LOG": "warn"})
    wait_port(o_port, p, "outside relay")
    i_port = free_port()
    uplink = f"""
[uplink]
to = "127.0.0.1:{o_port}"
id = "{UPLINK_ID}"
secret_file = "{secret_file}"
offer = ["{UPLINK_NAME}"]
"""
    i_conf = write(os.path.join(d, "uplink-inside.toml"),
                   porthole_conf(i_port, [env.backend, env.sink], host=UPLINK_NAME, name="porthole-inside",
                                 extra=uplink))
    p = start("uplink-inside", [env.relay_bin, "--config", i_conf], d, {"RUST_LOG": "warn"})
    wait_port(i_port, p, "inside relay")
    deadline, last = time.monotonic() + 20, None
    while time.monotonic() < deadline:
        try:
            check_http(o_port, "absolute", env.backend, host=UPLINK_NAME)
            return o_port, o_admin
        except Exception as e:  # noqa: BLE001 - 502 until I has registered
            last = e
            time.sleep(0.2)
    raise RuntimeError(f"the outside relay never relayed to {UPLINK_NAME}: {last}")


def start_rathole(env, rathole):
    """rathole server (outside) and client (inside), one service to the sink and one
    to the backend. Returns {'tcp': server's sink port, 'http': server's backend port}."""
    d = env.d
    token = os.urandom(16).hex()
    ctl, rs, rw = free_port(), free_port(), free_port()
    server = write(os.path.join(d, "rathole-server.toml"), f"""
[server]
bind_addr = "127.0.0.1:{ctl}"
default_token = "{token}"
[server.services.sink]
bind_addr = "127.0.0.1:{rs}"
[server.services.web]
bind_addr = "127.0.0.1:{rw}"
""")
    client = write(os.path.join(d, "rathole-client.toml"), f"""
[client]
remote_addr = "127.0.0.1:{ctl}"
default_token = "{token}"
[client.services.sink]
local_addr = "127.0.0.1:{env.sink}"
[client.services.web]
local_addr = "127.0.0.1:{env.backend}"
""")
    ps = start("rathole-server", [rathole, "--server", server], d, {"RUST_LOG": "warn"})
    wait_port(ctl, ps, "rathole server")
    pc = start("rathole-client", [rathole, "--client", client], d, {"RUST_LOG": "warn"})
    # The server opens a service's port once the client has registered it.
    wait_port(rs, ps, "rathole server (sink service)")
    wait_port(rw, ps, "rathole server (web service)")
    if pc.poll() is not None:
        raise RuntimeError(f"rathole client exited with {pc.returncode}")
    return {"tcp": rs, "http": rw}


def accepted(admin_port):
    """The outside relay's connections-accepted counter (clients and data connections)."""
    with socket.create_connection(("127.0.0.1", admin_port), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    for line in data.decode(errors="replace").splitlines():
        if line.startswith("porthole_connections_accepted"):
            return float(line.split()[-1])
    raise RuntimeError("no porthole_connections_accepted in /metrics")


def keepalive_probe(port, host, backend, n=5):
    """n requests one after the other on ONE client connection to `port`; returns how
    many were answered 200 on it before it closed."""
    answered = 0
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        buf = b""
        for _ in range(n):
            s.sendall(f"GET http://{host}:{backend}/1k HTTP/1.1\r\nHost: {host}:{backend}\r\n\r\n".encode())
            while b"\r\n\r\n" not in buf:
                chunk = s.recv(65536)
                if not chunk:
                    return answered
                buf += chunk
            head, _, buf = buf.partition(b"\r\n\r\n")
            m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            length = int(m.group(1)) if m else 0
            while len(buf) < length:
                chunk = s.recv(65536)
                if not chunk:
                    return answered
                buf += chunk
            buf = buf[length:]
            if b" 200 " not in head.split(b"\r\n")[0] + b" ":
                return answered
            answered += 1
    return answered


def uplink_suite(env, args, only, want, peers, rathole, record, fail, notes):
    """U1: one CONNECT stream's MB/s; U2: 1 KiB req/s (and p99), wrk -c50 keep-alive;
    through Porthole's uplink and through rathole, beside direct and one plain relay."""
    rows = {k: None for k, _ in U_ROWS if want(k)}
    if "direct" in rows:
        rows["direct"] = {"tcp": env.sink, "http": env.backend, "form": "origin", "host": "127.0.0.1"}
    if "porthole" in rows:
        if "porthole" in peers:
            rows["porthole"] = {**peers["porthole"], "form": "absolute", "host": "127.0.0.1"}
        else:
            fail(["U1", "U2", "U2p99"], "porthole", "could not start")
            del rows["porthole"]
    o_admin = None
    if "uplink" in rows:
        try:
            o_port, o_admin = start_uplink(env)
            rows["uplink"] = {"tcp": o_port, "http": o_port, "form": "absolute", "host": UPLINK_NAME}
            log(f"uplink: outside relay on {o_port} relays {UPLINK_NAME} through the inside relay")
            before = accepted(o_admin)
            n = keepalive_probe(o_port, UPLINK_NAME, env.backend)
            delta = accepted(o_admin) - before
            notes.append(f"uplink keep-alive: 5 requests on one client connection to O: {n} answered on it; "
                         f"O accepted {delta:.0f} connections meanwhile (the client's, and data "
                         f"connections from I: one, reused while it is kept alive)")
            log(notes[-1])
        except Exception as e:  # noqa: BLE001
            fail(["U1", "U2", "U2p99"], "uplink", f"could not start: {e}")
            log(f"uplink FAILED to start: {e}")
            del rows["uplink"]
    if "rathole" in rows:
        try:
            if not rathole:
                raise RuntimeError("rathole is not installed")
            rows["rathole"] = {**start_rathole(env, rathole), "form": "origin", "host": "127.0.0.1"}
            log(f"rathole: server ports {rows['rathole']['tcp']} (sink), {rows['rathole']['http']} (backend)")
            check_http(rows["rathole"]["http"], "origin", env.backend)
        except Exception as e:  # noqa: BLE001
            fail(["U1", "U2", "U2p99"], "rathole", str(e)[:300])
            log(f"rathole FAILED: {e}")
            del rows["rathole"]
    target_of = {k: (f"{UPLINK_NAME}:{env.sink}" if k == "uplink" else f"127.0.0.1:{env.sink}") for k in rows}
    data_per_req = []
    for rep in range(args.reps):
        if "U1" in only:
            for key, row in rows.items():
                try:
                    r = load_tool(env, ["bulk", "--to", f"127.0.0.1:{row['tcp']}", "--target", target_of[key],
                                        "--streams", "1", "--secs", str(args.bulk_secs)], args.bulk_secs + 30)
                except Exception as e:  # noqa: BLE001
                    fail(["U1"], key, str(e)[:120])
                    log(f"U1 rep {rep + 1}/{args.reps} {key}: FAILED {e}")
                    continue
                record("U1", key, r["mb_per_s"], f"{r['stream_errors']} stream errors" if r["stream_errors"] else None)
                log(f"U1 rep {rep + 1}/{args.reps} 1 stream {key:9} {r['mb_per_s']:>9,.0f} MB/s")
        if "U2" in only:
            for key, row in rows.items():
                try:
                    before = accepted(o_admin) if key == "uplink" else None
                    r = wrk(env, row["http"], row["form"], "/1k", args.duration, env.d, host=row["host"])
                    if before is not None and r["requests"]:
                        # wrk's own 50 connections (plus any reconnects) are in the delta too.
                        data_per_req.append((accepted(o_admin) - before - 50) / r["requests"])
                except Exception as e:  # noqa: BLE001
                    fail(["U2", "U2p99"], key, str(e)[:120])
                    log(f"U2 rep {rep + 1}/{args.reps} {key}: FAILED {e}")
                    continue
                flag = ", ".join(x for x in (f"{r['non_2xx']} non-2xx" if r["non_2xx"] else "",
                                             f"socket errors: {r['socket_errors']}" if r["socket_errors"] else "")
                                 if x) or None
                record("U2", key, r["rps"], flag)
                record("U2p99", key, r["p99_ms"], flag)
                log(f"U2 rep {rep + 1}/{args.reps} {key:9} {r['rps']:>10,.0f} req/s  p99 {r['p99_ms']:.2f} ms"
                    + (f"  ({flag})" if flag else ""))
    if data_per_req:
        notes.append("uplink under wrk -c50: O accepted "
                     + ", ".join(f"{x:.3f}" for x in data_per_req)
                     + " new connections per request beyond wrk's 50 (per repetition): data connections from "
                       "I are reused for the next request after a keep-alive response, as any upstream "
                       "keep-alive connection")


def uplink_report(res, rathole_how):
    if not any(k in res for k in ("U1", "U2")):
        return []
    lines = ["## Uplink (issue 5): Porthole's uplink beside rathole", "",
             "Outside relay O (`[[accept_uplink]]`) and inside relay I (`[uplink] to = O`, "
             f"offering `{UPLINK_NAME}`, routed to the backend's and the sink's ports); rathole server "
             "(outside) and client (inside) forwarding one service to the sink and one to the backend. "
             f"rathole: {rathole_how}. All on 127.0.0.1, default runtimes, RUST_LOG=warn.", "",
             "What each row measures: rathole is a TCP port forwarder. The client talks to rathole's "
             "server-side port directly (raw TCP for the stream, origin-form HTTP for wrk); rathole "
             "routes nothing, and each client TCP connection is one rathole data channel for its whole "
             "life, so wrk's 50 keep-alive connections are 50 channels carrying every request. "
             "Through Porthole the client asks O for a name (`CONNECT svc.bench:PORT`, "
             "`GET http://svc.bench:PORT/1k`); O routes it per request. A request with no idle data "
             "connection for that name opens an uplink session: a notification to I and a NEW data "
             "connection from I to O, over which I serves the request with its own route table; after "
             "a keep-alive response O keeps that data connection in its upstream pool for the next "
             "request, so under wrk the sessions are set up once per concurrent request. U1 (one long "
             "stream) costs the session set-up once.", ""]
    lines += table("U1: one CONNECT stream, bulk MB/s", "MB/s", "mbps", U_ROWS, res.get("U1", {}), refs=U_REFS)
    lines += table("U2: 1 KiB responses, wrk -t1 -c50 keep-alive, req/s", "req/s", "rps", U_ROWS,
                   res.get("U2", {}), refs=U_REFS)
    lines += table("U2: p99 latency of those runs", "ms", "ms", U_ROWS, res.get("U2p99", {}),
                   higher_better=False, refs=U_REFS)
    out = []
    for fig, what in (("U1", "stream MB/s"), ("U2", "req/s"), ("U2p99", "p99 ms")):
        u, r = summary(res.get(fig, {}).get("uplink", [])), summary(res.get(fig, {}).get("rathole", []))
        if u and r:
            out.append(f"- {fig} {what}: Porthole uplink {fmt(u['median'], 'ms' if fig == 'U2p99' else 'rps')}"
                       f" / rathole {fmt(r['median'], 'ms' if fig == 'U2p99' else 'rps')}"
                       f" = {u['median'] / r['median']:.2f}x")
    if out:
        lines += ["Porthole / rathole (medians):", ""] + out + [""]
    return lines


# ------------------------------------------------------------------ report


def fmt(v, kind):
    if v is None:
        return "-"
    if kind in ("rps", "mbps", "per_s"):
        return f"{v:,.0f}"
    if kind == "kib":
        return f"{v:,.2f}"
    return f"{v:.2f}"


def summary(values):
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"min": min(vals), "median": statistics.median(vals), "max": max(vals), "n": len(vals)}


def table(title, unit, kind, rows, results, higher_better=True, note="", refs=None):
    """rows: [(key, label)], results: {key: [values]}. Empty for a figure not run (`--only`);
    rows neither measured nor failed (left out by `--rows`) are left out. refs: the
    [(key, name)] rows whose median is divided by every row's (default: the Portholes)."""
    if not results:
        return []
    if refs is None:
        refs = [(p, "Porthole" if p == "porthole" else "Porthole 1w") for p in PORTHOLES]
    rows = [(k, l) for k, l in rows if k in results or f"{k}:error" in results]
    heads = ["target", f"median {unit}", "min", "max", "n"]
    present = [(p, n) for p, n in refs if summary(results.get(p, []))]
    heads += [f"{n} ÷ this" for _, n in present]
    lines = [f"### {title}", ""]
    if note:
        lines += [note, ""]
    lines += ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for key, label in rows:
        s = summary(results.get(key, []))
        failure = results.get(f"{key}:error")
        if not s:
            why = failure or "not measured"
            lines.append(f"| {label} | {why} |" + " |" * (len(heads) - 2))
            continue
        cells = [label, fmt(s["median"], kind), fmt(s["min"], kind), fmt(s["max"], kind), str(s["n"])]
        for p, _ in present:
            ps = summary(results[p])
            cells.append(f"{ps['median'] / s['median']:.2f}x" if s["median"] else "-")
        flag = results.get(f"{key}:flag")
        if flag:
            cells[0] += f" ⚠ {flag}"
        lines.append("| " + " | ".join(cells) + " |")
    direction = "higher is better" if higher_better else "lower is better"
    lines += ["", f"Ratio columns: {' / '.join(n for _, n in present)} median divided by the row's median "
              f"({direction}).", ""]
    return lines


def best_peer(results, keys, higher_better=True):
    cands = [(summary(results.get(k, [])), k) for k in keys]
    cands = [(s["median"], k) for s, k in cands if s]
    if not cands:
        return None, None
    return (max if higher_better else min)(cands)


def verdicts(res):
    out = []

    def med(figure, key):
        s = summary(res.get(figure, {}).get(key, []))
        return s["median"] if s else None

    peers_http = ["nginx", "haproxy", "squid", "tinyproxy"]
    for p in PORTHOLES:
        name = "Porthole" if p == "porthole" else "Porthole 1w"
        v = med("P1", p)
        bv, bk = best_peer(res.get("P1", {}), peers_http)
        sq = med("P1", "squid")
        if v and bv:
            ok = v >= bv and (sq is None or v >= 3 * sq)
            out.append(f"- P1 {name}: {v:,.0f} req/s = {v / bv:.2f}x best peer ({bk}){f', {v / sq:.2f}x Squid' if sq else ''}: {'met' if ok else 'NOT met'}")
        v = med("P2", p)
        bv, bk = best_peer(res.get("P2", {}), peers_http, higher_better=False)
        if v and bv:
            out.append(f"- P2 {name}: p99 {v:.2f} ms vs best peer {bv:.2f} ms ({bk}): {'met' if v <= bv else 'NOT met'}")
        v = med("P3", p)
        bv, bk = best_peer(res.get("P3", {}), peers_http)
        if v and bv:
            out.append(f"- P3 {name}: {v:,.0f} MB/s = {v / bv:.2f}x best peer ({bk}): {'met' if v >= bv else 'NOT met'}")
        for fig, label in (("P4-1", "one stream"), ("P4-8", "8 streams")):
            v, d = med(fig, p), med(fig, "direct")
            if v and d:
                out.append(f"- P4 {label} {name}: {v:,.0f} MB/s = {v / d:.2f}x direct (target 0.8x): {'met' if v >= 0.8 * d else 'NOT met'}")
        v = med("P5", p)
        if v is not None:
            out.append(f"- P5 {name}: {v:.2f} KiB per idle tunnel (target at most 2 KiB): {'met' if v <= 2 else 'NOT met'}")
        v = med("P6", p)
        bv, bk = best_peer(res.get("P6", {}), ["squid", "tinyproxy"])
        ceiling = med("P6", "direct")
        if v and bv:
            out.append(f"- P6 {name}: {v:,.0f} setups/s = {v / bv:.2f}x best CONNECT peer ({bk}){f', {v / ceiling:.2f}x the client ceiling' if ceiling else ''}: {'met' if v >= bv else 'NOT met'}")
    return out


def write_report(path, args, info, vers, res, one_worker_how, started, notes):
    lines = ["# Porthole side-by-side benchmark", "",
             f"Command: `{' '.join(args.command_line)}`  ",
             f"Started {started} UTC, took {time.monotonic() - T0:.0f} s. "
             f"{args.reps} interleaved repetitions per figure; each cell is min/median/max over them.", "",
             "All processes (load generator, proxy, backend, sink) share this machine's cores, "
             "and other work may have been running on it: compare rows of the same run, not runs.", "",
             "## Machine", ""]
    for k, v in info.items():
        lines.append(f"- {k}: {' '.join(v) if isinstance(v, list) else v}")
    lines += [f"- load at end: {' '.join(open('/proc/loadavg').read().split()[0:3])}", "", "## Versions", ""]
    for k, v in vers.items():
        lines.append(f"- {k}: {v}")
    p_figs = bool(res.keys() - {"U1", "U2", "U2p99"})
    settings = [f"- HTTP: `wrk -t1 -c50 -d{args.duration}s --latency`; backend nginx (1 worker, keep-alive) serving "
                "1 KiB and 1 MiB files; nginx and HAProxy as reverse proxies get origin-form requests, Squid, "
                "tinyproxy and Porthole absolute-form ones (a wrk Lua script sets `wrk.path`).",
                f"- Porthole with RUST_LOG=warn (the peers write no access log either), except the `access log on` row "
                f"({getattr(args, 'access_log_how', '?')}). "
                f"One worker thread: {one_worker_how}.",
                f"- Tunnels: `tunnel_load` (benches/tools/tunnel_load.rs) is the client and the sink for every row; "
                f"bulk pushes for {args.bulk_secs}s after a 0.5s warm-up; idle holds {args.idle_n} tunnels "
                f"(fresh proxy per repetition, RSS of the process tree before and after); setups at concurrency 20 "
                f"for {args.setup_secs}s.",
                "- Peers not configurable equivalently: socat is not a CONNECT proxy and forks a process per "
                "connection, so it is a row of P4 only (its per-tunnel RSS would count a whole process); "
                "tinyproxy has no upstream keep-alive (it closes the server connection after each request), which is "
                "its design, not a setting."]
    shim_measured = any(res.get(f, {}).get("shim") for f in ("P1", "P4-1", "P4-8"))
    if shim_measured:
        settings += [
                "- Through the shim (issue 7): `porthole-shim` (RUST_LOG=warn) listens as a local proxy and "
                "carries every request and every CONNECT as one stream of its single HTTP/2 (h2c) link to the "
                "default-runtime Porthole row's relay; wrk and tunnel_load talk to the shim exactly as to a "
                "forward proxy (absolute-form requests, `CONNECT`). Rows of P1/P2 and P4 only."]
    if not p_figs:
        settings = [f"- `wrk -t1 -c50 -d{args.duration}s --latency` against a backend nginx (1 worker, keep-alive) "
                    f"serving a 1 KiB file; `tunnel_load bulk` (benches/tools/tunnel_load.rs) pushes one stream "
                    f"for {args.bulk_secs}s after a 0.5s warm-up into `tunnel_load sink`."]
    lines += ["", "## Settings", ""] + settings + [""]
    lines += ["## Results", ""]
    if res.keys() - {"U1", "U2", "U2p99"}:
        lines += p_tables(args, res)
    lines += uplink_report(res, getattr(args, "rathole_how", "?"))
    if notes:
        lines += ["## Notes from this run", ""] + [f"- {n}" for n in notes] + [""]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines))


def p_tables(args, res):
    lines = table("P1: HTTP relay, 1 KiB responses, c=50", "req/s", "rps",
                   [(k, l) for k, l, _ in HTTP_ROWS], res.get("P1", {}))
    lines += table("P2: p99 latency at that load", "ms", "ms",
                   [(k, l) for k, l, _ in HTTP_ROWS], res.get("P2", {}), higher_better=False,
                   note="Ratio < 1 means Porthole's p99 is lower.")
    lines += table("P3: HTTP relay, 1 MiB responses, c=50", "MB/s", "mbps",
                   [(k, l) for k, l, _ in HTTP_ROWS if k not in P3_SKIP], res.get("P3", {}),
                   note="MB/s = responses per second × 1,048,576 body bytes / 10^6.")
    lines += table("P4: CONNECT bulk throughput, one stream", "MB/s", "mbps", TUNNEL_ROWS, res.get("P4-1", {}))
    lines += table("P4: CONNECT bulk throughput, 8 parallel streams", "MB/s", "mbps", TUNNEL_ROWS,
                   res.get("P4-8", {}))
    lines += table(f"P5: RSS growth per idle tunnel, {args.idle_n} open", "KiB", "kib",
                   [(k, LABELS.get(k, k)) for k in IDLE_ROWS], res.get("P5", {}), higher_better=False,
                   note="Ratio < 1 means Porthole holds less per tunnel.")
    lines += table("P6: CONNECT setups per second, concurrency 20 (open, CONNECT, 200, close)", "setups/s",
                   "per_s", SETUP_ROWS, res.get("P6", {}))
    lines += ["## Targets of issue 7 (medians of this run)", ""] + verdicts(res) + [""]
    shim = []
    for fig, what, kind in (("P1", "1 KiB req/s", "rps"), ("P2", "p99 ms", "ms"),
                            ("P4-1", "CONNECT 1 stream MB/s", "mbps"), ("P4-8", "CONNECT 8 streams MB/s", "mbps")):
        s, r = summary(res.get(fig, {}).get("shim", [])), summary(res.get(fig, {}).get("porthole", []))
        if s and r:
            shim.append(f"- {fig} {what}: through the shim {fmt(s['median'], kind)}, straight to the relay "
                        f"{fmt(r['median'], kind)} ({s['median'] / r['median']:.2f}x)")
    if shim:
        lines += ["## Through the shim (issue 7), medians", ""] + shim + [""]
    return lines


# ------------------------------------------------------------------ main


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="1 repetition, short durations (a smoke run)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--duration", type=int, default=8, help="wrk seconds per HTTP measurement")
    ap.add_argument("--only", default="P1,P3,P4,P5,P6",
                    help="comma list of P1,P3,P4,P5,P6 (P2 comes with P1) and the uplink figures U1,U2 "
                         "(against rathole, issue 5; not in the default run)")
    ap.add_argument("--rows", default="",
                    help="comma list of row keys to run (default: all), e.g. direct,porthole,shim or "
                         "direct,uplink,rathole")
    ap.add_argument("--no-install", action="store_true")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the configs and logs of the run")
    ap.add_argument("--out", default=os.path.join(ROOT, "target", "bench", "report.md"))
    args = ap.parse_args()
    args.command_line = ["benches/run.sh"] + sys.argv[1:]
    args.bulk_secs, args.setup_secs, args.idle_n = 3.0, 3.0, 2000
    if args.quick:
        args.reps, args.duration, args.bulk_secs, args.setup_secs, args.idle_n = 1, 2, 1.0, 1.0, 500
    only = set(args.only.upper().split(","))
    rows_wanted = {r.strip() for r in args.rows.split(",") if r.strip()}

    def want(key):
        return not rows_wanted or key in rows_wanted

    atexit.register(stop_all)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())

    if not args.no_install:
        install_missing()
    target_dir = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    if args.no_build:
        relay_bin, load_bin, shim_bin = binaries(target_dir)
    else:
        relay_bin, load_bin, shim_bin = build(target_dir)
    rathole, rathole_how = None, "not measured"
    if only & {"U1", "U2"} and want("rathole"):
        try:
            rathole = find_rathole() if args.no_install else install_rathole()
            if not rathole:
                raise RuntimeError("not on PATH nor in ~/.cargo/bin (--no-install)")
            rathole_how = f"`{rathole}`, installed with `{' '.join(RATHOLE_INSTALL)}`"
        except Exception as e:  # noqa: BLE001 - the Porthole rows are still measured
            rathole_how = f"could not be installed: {e}"
            log(f"rathole: {rathole_how}")
    info, vers = machine(), versions(relay_bin)
    if want("shim") and only & {"P1", "P4"}:
        vers["porthole-shim"] = first_line([shim_bin, "--version"])
    if not only & {"P1", "P3", "P4", "P5", "P6"}:
        vers = {k: v for k, v in vers.items() if k in ("porthole", "wrk")}
    if rathole:
        # `rathole --version` prints "rathole " and then build facts, one a line.
        out = run([rathole, "--version"], 10).stdout
        m = re.search(r"Build Version:\s*(\S+)", out)
        feats = re.search(r"cargo Features:\s*(\S+)", out)
        vers["rathole"] = f"rathole {m.group(1) if m else '?'} (features {feats.group(1) if feats else '?'})"
    log(f"machine: {info['nproc']} cores, {info['cpu']}, kernel {info['kernel']}, load {' '.join(info['load at start'])}")

    d = tempfile.mkdtemp(prefix="porthole-bench-")
    os.chmod(d, 0o777)  # squid and tinyproxy drop privileges and write their logs here
    log(f"configs and logs in {d}")
    env = Env(d, relay_bin, load_bin, shim_bin)
    env.one_worker = one_worker_mode(relay_bin)
    notes = []

    # The shared backend and sink.
    env.backend = free_port()
    conf = write(os.path.join(d, "backend.conf"), nginx_backend_conf(d, env.backend))
    p = start("backend", ["nginx", "-c", conf, "-p", d, "-e", f"{d}/backend-error.log"], d)
    wait_port(env.backend, p, "backend")
    env.sink = free_port()
    p = start("sink", [load_bin, "sink", "--listen", f"127.0.0.1:{env.sink}"], d)
    wait_port(env.sink, p, "sink")
    log(f"backend nginx on {env.backend}, sink on {env.sink}")

    # Long-running peers for P1, P3, P4, P6 (the uplink figures need only the
    # plain Porthole; the shim needs the plain Porthole it links to).
    peers = {"direct": {"http": env.backend, "tcp": env.sink, "proc": None}}
    failed = {}
    kinds = ["nginx", "haproxy", "squid", "tinyproxy", "socat", "porthole", "porthole-1w", "porthole-log", "shim"]
    if not only & {"P1", "P3", "P4", "P5", "P6"}:
        kinds = ["porthole"]
    if "porthole" in kinds and not want("porthole") and not (want("shim") and only & {"P1", "P4"}):
        kinds.remove("porthole")
    kinds = [k for k in kinds if k == "porthole" or want(k)]
    for kind in kinds:
        try:
            peers[kind] = start_peer(env, kind)
            log(f"started {kind}: {({k: v for k, v in peers[kind].items() if k != 'proc'})}")
        except Exception as e:  # noqa: BLE001 - reported in the table
            failed[kind] = f"could not start: {e}"
            log(f"{kind} FAILED to start: {e}")
    for p in PORTHOLES:
        if p in peers:
            n = runtime_workers(peers[p]["proc"].pid)
            notes.append(f"{p}: {n} connection worker thread(s) counted in /proc at start")
            log(f"{p}: {n} connection worker threads")

    res = {}

    def record(fig, key, value, flag=None):
        res.setdefault(fig, {}).setdefault(key, []).append(value)
        if flag:
            res[fig][f"{key}:flag"] = flag

    def fail(figs, key, why):
        for fig in figs:
            res.setdefault(fig, {})[f"{key}:error"] = why

    # ---- P1/P2/P3
    http_rows = [(k, form) for k, _, form in HTTP_ROWS if want(k)] if only & {"P1", "P3"} else []
    for key, form in list(http_rows):
        if key in failed:
            fail(["P1", "P2", "P3"], key, failed[key])
            http_rows.remove((key, form))
            continue
        try:
            check_http(peers[key]["http"], form, env.backend)
        except Exception as e:  # noqa: BLE001
            fail(["P1", "P2", "P3"], key, f"check request failed: {e}")
            log(f"{key}: check request failed: {e}")
            http_rows.remove((key, form))
    for fig, path in (("P1", "/1k"), ("P3", "/1m")):
        if fig not in only:
            continue
        for rep in range(args.reps):
            for key, form in http_rows:
                if fig == "P3" and key in P3_SKIP:
                    continue
                try:
                    r = wrk(env, peers[key]["http"], form, path, args.duration, d)
                except Exception as e:  # noqa: BLE001
                    fail([fig], key, str(e)[:120])
                    log(f"{fig} rep {rep + 1}/{args.reps} {key}: FAILED {e}")
                    continue
                flag = None
                if r["non_2xx"] or r["socket_errors"]:
                    # tinyproxy closes every client connection after its response: wrk
                    # counts each close as a read error and reconnects.
                    flag = ", ".join(x for x in (f"{r['non_2xx']} non-2xx" if r["non_2xx"] else "",
                                                 f"socket errors: {r['socket_errors']}" if r["socket_errors"] else "")
                                     if x)
                if fig == "P1":
                    record("P1", key, r["rps"], flag)
                    record("P2", key, r["p99_ms"], flag)
                    log(f"P1/P2 rep {rep + 1}/{args.reps} {key:13} {r['rps']:>10,.0f} req/s  p99 {r['p99_ms']:.2f} ms"
                        + (f"  ({flag})" if flag else ""))
                else:
                    mbps = r["rps"] * 1048576 / 1e6
                    record("P3", key, mbps, flag)
                    log(f"P3 rep {rep + 1}/{args.reps} {key:13} {mbps:>10,.0f} MB/s ({r['rps']:,.0f} resp/s)"
                        + (f"  ({flag})" if flag else ""))

    # ---- P4
    target = f"127.0.0.1:{env.sink}"
    if "P4" in only:
        for rep in range(args.reps):
            for streams in (1, 8):
                fig = f"P4-{streams}"
                for key, _ in TUNNEL_ROWS:
                    if not want(key):
                        continue
                    if key in failed:
                        fail([fig], key, failed[key])
                        continue
                    try:
                        r = load_tool(env, ["bulk", "--to", f"127.0.0.1:{peers[key]['tcp']}", "--target", target,
                                            "--streams", str(streams), "--secs", str(args.bulk_secs)],
                                      args.bulk_secs + 30)
                    except Exception as e:  # noqa: BLE001
                        fail([fig], key, str(e)[:120])
                        log(f"P4 rep {rep + 1}/{args.reps} {streams} stream(s) {key}: FAILED {e}")
                        continue
                    flag = f"{r['stream_errors']} stream errors" if r["stream_errors"] else None
                    record(fig, key, r["mb_per_s"], flag)
                    log(f"P4 rep {rep + 1}/{args.reps} {streams} stream(s) {key:12} {r['mb_per_s']:>9,.0f} MB/s")

    # ---- P6
    if "P6" in only:
        for rep in range(args.reps):
            for key, _ in SETUP_ROWS:
                peer = "direct" if key == "plain" else key
                if not want(key):
                    continue
                if peer in failed:
                    fail(["P6"], key, failed[peer])
                    continue
                extra = ["--plain"] if key == "plain" else []
                try:
                    r = load_tool(env, ["setups", "--to", f"127.0.0.1:{peers[peer]['tcp']}", "--target", target,
                                        "--concurrency", "20", "--secs", str(args.setup_secs), *extra],
                                  args.setup_secs + 30)
                except Exception as e:  # noqa: BLE001
                    fail(["P6"], key, str(e)[:120])
                    log(f"P6 rep {rep + 1}/{args.reps} {key}: FAILED {e}")
                    continue
                flag = f"{r['errors']} errors ({r['last_error'][:60]})" if r["errors"] else None
                record("P6", key, r["per_s"], flag)
                log(f"P6 rep {rep + 1}/{args.reps} {key:12} {r['per_s']:>9,.0f} setups/s"
                    + (f"  ({flag})" if flag else ""))

    # ---- P5: a fresh proxy per repetition, so earlier loads do not hide growth.
    if "P5" in only:
        for rep in range(args.reps):
            for key in IDLE_ROWS:
                if not want(key):
                    continue
                if key in failed:
                    fail(["P5"], key, failed[key])
                    continue
                inst = None
                try:
                    inst = start_peer(env, key, http=False)
                    r = load_tool(env, ["idle", "--to", f"127.0.0.1:{inst['tcp']}", "--target", target,
                                        "--n", str(args.idle_n), "--pids", str(inst["proc"].pid)], 120)
                except Exception as e:  # noqa: BLE001
                    fail(["P5"], key, str(e)[:120])
                    log(f"P5 rep {rep + 1}/{args.reps} {key}: FAILED {e}")
                    continue
                finally:
                    if inst:
                        stop(inst["proc"])
                if r["alive"] < args.idle_n:
                    flag = f"only {r['alive']} of {args.idle_n} open ({r['last_error'][:60]})"
                else:
                    flag = None
                record("P5", key, r["kib_per_tunnel"], flag)
                log(f"P5 rep {rep + 1}/{args.reps} {key:12} {r['kib_per_tunnel']:>8.2f} KiB/tunnel "
                    f"(RSS {r['rss_before_kib']} -> {r['rss_after_kib']} KiB, {r['alive']} open)"
                    + (f"  ({flag})" if flag else ""))

    # ---- U1/U2: the uplink against rathole (issue 5)
    if only & {"U1", "U2"}:
        uplink_suite(env, args, only, want, peers, rathole, record, fail, notes)

    stop_all()
    args.access_log_how = env.access_log_how
    args.rathole_how = rathole_how
    write_report(args.out, args, info, vers, res, env.one_worker[2], started, notes)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"machine": info, "versions": vers, "results": res}, f, indent=1)
    if args.keep:
        log(f"configs and logs kept in {d}")
    else:
        shutil.rmtree(d, ignore_errors=True)
    log(f"report: {args.out}")
    print(open(args.out).read())


if __name__ == "__main__":
    main()
