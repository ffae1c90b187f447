#!/usr/bin/env bash
# The Debian package, end to end on this machine: build it as README.md's "Install" does,
# check its contents, lint it, then install, upgrade, remove, reinstall and purge it, checking
# at each step what the maintainer scripts promise (packaging/debian/). .ci/run runs it.
#
# It installs into this machine's root file system (as root, or through sudo), so it refuses
# to run where aiq-braze-sync is installed or has left an account or a queue, unless those are
# an interrupted run's of this script; at exit it removes everything it made, the account too.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS

CARGO_DEB_VERSION=3.8.0
PKG=aiq-braze-sync
UNIT=aiq-braze-sync.service
CONF=/etc/aiq-braze-sync/config.toml
STATE=/var/lib/aiq-braze-sync
PRIVATE=/var/lib/private/aiq-braze-sync
WANTS=/etc/systemd/system/multi-user.target.wants/$UNIT
# Present from before this script's first dpkg call until its cleanup is done: leftovers
# found together with it are this script's own.
MARKER=/var/tmp/aiq-braze-sync-test-deb.running

as_root=""
[ "$(id -u)" -eq 0 ] || as_root="sudo"
fail() {
  echo "test-deb: FAIL: $*" >&2
  exit 1
}

# --- tools -------------------------------------------------------------------------------
if [ "$(cargo deb --version 2>/dev/null)" != "cargo-deb $CARGO_DEB_VERSION" ]; then
  echo "== cargo install cargo-deb $CARGO_DEB_VERSION"
  cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked
fi
if ! command -v lintian >/dev/null 2>&1; then
  $as_root apt-get update -qq && $as_root apt-get install -y -qq lintian
fi

# --- this machine --------------------------------------------------------------------------
leftovers() {
  dpkg-query -W -f='${db:Status-Status}' "$PKG" 2>/dev/null | grep -qv '^not-installed$' ||
    getent passwd "$PKG" >/dev/null || [ -e "$STATE" ] || [ -L "$STATE" ] || $as_root test -e "$PRIVATE"
}
cleanup() {
  if [ -e "$MARKER" ]; then
    $as_root env AIQ_BRAZE_SYNC_PURGE_DATA=yes dpkg --purge "$PKG" >/dev/null 2>&1 || true
    $as_root rm -rf "$STATE" "$PRIVATE" /etc/aiq-braze-sync
    if getent passwd "$PKG" >/dev/null; then $as_root userdel "$PKG"; fi
    if getent group "$PKG" >/dev/null; then $as_root groupdel "$PKG"; fi
    # systemd's parent of private state directories, if the package made it.
    [ "$private_existed" = yes ] || $as_root rmdir /var/lib/private 2>/dev/null || true
    $as_root rm -f "$MARKER"
  fi
  rm -rf "$work"
}
work=$(mktemp -d)
# Whether /var/lib/private was here before this run (an interrupted run's, emptied, goes).
private_existed=no
trap cleanup EXIT
if leftovers; then
  [ -e "$MARKER" ] ||
    fail "this machine has aiq-braze-sync installed, or its account or queue ($STATE); this test installs and purges the package, so it runs only where there is none"
  echo "== removing what an interrupted run left"
  cleanup
  work=$(mktemp -d)
fi
[ ! -d /var/lib/private ] || private_existed=yes

# --- build ---------------------------------------------------------------------------------
# One optimised build for both binaries ([profile.deb], which `cargo deb` selects): the
# generator then writes the man pages, completions, unit and conffile into target/package,
# where Cargo.toml's [package.metadata.deb] assets name them.
echo "== cargo build --profile deb"
build_started=$SECONDS
cargo build --profile deb --locked -p aiq-braze-sync -p aiq-braze-sync-packaging
echo "build: $((SECONDS - build_started)) s"
built=${CARGO_TARGET_DIR:-target}/deb
"$built/aiq-braze-sync-packaging" target/package >/dev/null
version=$("$built/aiq-braze-sync" --version | cut -d' ' -f2)
echo "== cargo deb --no-build"
cargo deb --no-build -o "$work/$PKG.deb"
# The upgrade's package: the same files under a later version.
cargo deb --no-build --deb-version "$version-1+upgrade" -o "$work/$PKG-upgrade.deb"
deb=$work/$PKG.deb

echo "== dpkg-deb -c / conffiles"
contents=$(dpkg-deb -c "$deb" | awk '{ print $6 }')
for f in /usr/bin/aiq-braze-sync /lib/systemd/system/$UNIT $CONF \
  /usr/share/man/man1/aiq-braze-sync.1.gz /usr/share/man/man1/aiq-braze-sync-run.1.gz \
  /usr/share/man/man1/aiq-braze-sync-queue-stats.1.gz \
  /usr/share/bash-completion/completions/aiq-braze-sync \
  /usr/share/zsh/vendor-completions/_aiq-braze-sync \
  /usr/share/fish/vendor_completions.d/aiq-braze-sync.fish \
  /usr/share/doc/aiq-braze-sync/README.md /usr/share/doc/aiq-braze-sync/copyright \
  /usr/share/doc/aiq-braze-sync/changelog.Debian.gz; do
  grep -qxF ".$f" <<<"$contents" || fail "the package lacks $f"
done
[ "$(dpkg-deb --info "$deb" conffiles)" = "$CONF" ] ||
  fail "conffiles is not just $CONF: $(dpkg-deb --info "$deb" conffiles)"
dpkg-deb --fsys-tarfile "$deb" | tar -xO ".$CONF" | grep -q '^# endpoint = ' ||
  fail "the packaged config sets braze.endpoint: it is the operator's to set"
echo "contents: ok"

echo "== lintian"
# Exits non-zero on any error; warnings are printed and allowed.
lint_ok=yes
lint=$(lintian "$deb" 2>&1) || lint_ok=no
grep -v '^running with root privileges' <<<"$lint" || true
[ "$lint_ok" = yes ] || fail "lintian found errors"

# --- what the maintainer scripts ask of systemd ------------------------------------------
# They call systemctl and deb-systemd-invoke only where systemd runs (/run/systemd/system),
# and CI's machine runs none. So each dpkg call below runs in a private mount namespace whose
# empty /run holds that directory, with stand-ins for those two commands that log what they
# are asked: the test sees what each step would ask of systemd, and a machine that does run
# systemd is asked nothing. Without namespaces (no privilege for unshare) dpkg runs as is.
shims=$work/shims
calls=$work/systemd-calls
mkdir -p "$shims"
for cmd in systemctl deb-systemd-invoke; do
  printf '#!/bin/sh\necho "%s $*" >>"%s"\n' "$cmd" "$calls" >"$shims/$cmd"
  chmod 0755 "$shims/$cmd"
done
as_if_systemd=no
if $as_root unshare --mount --propagation private true 2>/dev/null; then as_if_systemd=yes; fi
pkg() { # dpkg ARGS...
  : >"$calls"
  if [ "$as_if_systemd" = yes ]; then
    $as_root env PATH="$shims:$PATH" AIQ_BRAZE_SYNC_PURGE_DATA="${AIQ_BRAZE_SYNC_PURGE_DATA:-}" \
      unshare --mount --propagation private \
      sh -c 'mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/system && exec dpkg "$@"' sh "$@"
  else
    $as_root env AIQ_BRAZE_SYNC_PURGE_DATA="${AIQ_BRAZE_SYNC_PURGE_DATA:-}" dpkg "$@"
  fi
}
# asked WHAT: that step asked systemd exactly this (a line of $calls).
asked() {
  [ "$as_if_systemd" = no ] || grep -qxF "$1" "$calls" || fail "not asked: $1 (asked: $(cat "$calls"))"
}
# never_started: that step asked systemd to start, restart or enable nothing (try-restart,
# which leaves a stopped unit stopped, is allowed).
never_started() {
  ! grep -Eq ' (start|restart|enable|reenable|preset)( |$)' "$calls" ||
    fail "the scripts asked systemd to start or enable: $(cat "$calls")"
}

# --- first install -------------------------------------------------------------------------
$as_root touch "$MARKER"
echo "== dpkg -i (first install)"
pkg -i "$deb"
[ "$as_if_systemd" = yes ] || echo "(unshare not permitted: calls to systemd not checked)"
[ "$(cat "$calls")" = "systemctl --system daemon-reload" ] || [ "$as_if_systemd" = no ] ||
  fail "a first install asked systemd for more than daemon-reload: $(cat "$calls")"
[ "$(dpkg-query -W -f='${Status} ${Version}' "$PKG")" = "install ok installed $version-1" ] ||
  fail "not installed: $(dpkg-query -W -f='${Status} ${Version}' "$PKG")"
dpkg-query -W -f='${Conffiles}\n' "$PKG" | grep -q "^ $CONF " || fail "$CONF is not a conffile"

[ "$(/usr/bin/aiq-braze-sync --version)" = "aiq-braze-sync $version" ] ||
  fail "aiq-braze-sync --version: $(/usr/bin/aiq-braze-sync --version)"

# The account, and the queue's directory as systemd lays out a DynamicUser= StateDirectory=.
uid=$(id -u "$PKG") || fail "no account $PKG"
[ "$uid" -lt 1000 ] || fail "$PKG is not a system account (uid $uid)"
[ "$(readlink "$STATE")" = private/aiq-braze-sync ] || fail "$STATE is not a link to private/aiq-braze-sync"
[ "$($as_root stat -L -c '%U:%G %a' "$STATE")" = "$PKG:$PKG 700" ] ||
  fail "$STATE: $($as_root stat -L -c '%U:%G %a' "$STATE"), not $PKG:$PKG 700"
[ "$($as_root stat -c '%U %a' /var/lib/private)" = "root 700" ] || fail "/var/lib/private is not root's 0700"

# Installed, neither enabled nor started.
not_started() {
  if [ -d /run/systemd/system ] && systemctl is-active --quiet "$UNIT"; then
    fail "the package started $UNIT"
  fi
  if pgrep -f "^/usr/bin/aiq-braze-sync " >/dev/null; then fail "/usr/bin/aiq-braze-sync is running"; fi
}
not_started
[ "$(systemctl is-enabled "$UNIT" 2>&1 || true)" = disabled ] ||
  fail "$UNIT is $(systemctl is-enabled "$UNIT" 2>&1 || true), not disabled"
[ ! -e "$WANTS" ] || fail "$UNIT is enabled"

# The installed unit as .ci/run checks the repository's: no output from verify.
if command -v systemd-analyze >/dev/null 2>&1; then
  verify=$(systemd-analyze verify "/lib/systemd/system/$UNIT" 2>&1) && [ -z "$verify" ] ||
    fail "systemd-analyze verify: $verify"
fi
man -w aiq-braze-sync >/dev/null 2>&1 || ! command -v man >/dev/null || fail "man finds no aiq-braze-sync(1)"
bash -c 'source /usr/share/bash-completion/completions/aiq-braze-sync && complete -p aiq-braze-sync' >/dev/null ||
  fail "the bash completion does not load"
echo "install: ok (account, $STATE, conffile, unit neither enabled nor started: $(tr '\n' ';' <"$calls"))"

# --- the installed binary ------------------------------------------------------------------
echo "== aiq-braze-sync check, as installed (braze.endpoint unset: exit 2)"
set +e
out=$(aiq-braze-sync check 2>&1)
rc=$?
set -e
[ "$rc" -eq 2 ] && grep -q 'braze.endpoint' <<<"$out" || fail "check exited $rc: $out"
echo "$out"

# `demo` runs the installed binary's whole pipeline against its in-process fake Braze, on
# loopback.
echo "== aiq-braze-sync demo"
out=$(TMPDIR=$work aiq-braze-sync demo --data data --outage-secs 0 2>&1) || fail "demo: $out"
grep -q 'dead letters    0' <<<"$out" || fail "demo: $out"
tail -n 9 <<<"$out"

# The operator's steps from the conffile's header, with an endpoint on a closed loopback port
# (nothing leaves this machine): `check` then gets past the configuration to exit 3.
echo "== configured as README.md says, check reaches the endpoint (unreachable: exit 3)"
$as_root sed -i 's|^# endpoint = .*|endpoint = "http://127.0.0.1:9"|' "$CONF"
$as_root install -m 0600 /dev/null /etc/aiq-braze-sync/braze-api-key
echo "test-deb-not-a-real-key" | $as_root tee /etc/aiq-braze-sync/braze-api-key >/dev/null
set +e
out=$($as_root aiq-braze-sync check 2>&1)
rc=$?
set -e
[ "$rc" -eq 3 ] || fail "check exited $rc, not 3: $out"

# And against a Braze stand-in, the workspace's fake-braze run as a process of its own: the
# installed binary's `check` proves endpoint, key and both permissions (exit 0). The
# endpoint goes back to the closed port afterwards, which the steps below expect.
echo "== check against a fake Braze, as installed (exit 0)"
cargo build -q --locked -p fake-braze --bin fake-braze
fake_url_file=$work/fake-braze.url
"${CARGO_TARGET_DIR:-target}/debug/fake-braze" --key test-deb-not-a-real-key >"$fake_url_file" &
fake_pid=$!
for _ in $(seq 100); do [ -s "$fake_url_file" ] && break; sleep 0.1; done
fake_url=$(head -n 1 "$fake_url_file")
[ -n "$fake_url" ] || fail "fake-braze printed no URL"
$as_root sed -i "s|^endpoint = .*|endpoint = \"$fake_url\"|" "$CONF"
set +e
out=$($as_root aiq-braze-sync check 2>&1)
rc=$?
set -e
kill "$fake_pid" 2>/dev/null || true
wait "$fake_pid" 2>/dev/null || true
[ "$rc" -eq 0 ] || fail "check against the fake Braze exited $rc, not 0: $out"
tail -n 3 <<<"$out"
$as_root sed -i 's|^endpoint = .*|endpoint = "http://127.0.0.1:9"|' "$CONF"

# Something in the queue for remove and purge to keep: the sample memberships, queued into
# the stopped daemon's database in $STATE.
$as_root aiq-braze-sync import memberships data/audience_export.csv >/dev/null
pending() { $as_root aiq-braze-sync queue stats --json | grep -o '"pending": *[0-9]*' | head -n 1 | tr -dc 0-9; }
queued=$(pending)
[ "${queued:-0}" -gt 0 ] || fail "nothing queued"
echo "queued: $queued"

# --- upgrade -------------------------------------------------------------------------------
# With the operator having enabled the unit (offline: links only; nothing starts here).
$as_root systemctl enable "$UNIT" >/dev/null 2>&1
[ -L "$WANTS" ] || fail "systemctl enable made no link"
echo "== dpkg -i (upgrade to $version-1+upgrade)"
pkg --force-confold -i "$work/$PKG-upgrade.deb"
asked "deb-systemd-invoke try-restart $UNIT"
never_started
[ "$(dpkg-query -W -f='${Version}' "$PKG")" = "$version-1+upgrade" ] || fail "not upgraded"
grep -q '^endpoint = "http://127.0.0.1:9"' "$CONF" || fail "the upgrade lost the operator's $CONF"
[ -L "$WANTS" ] || fail "the upgrade disabled $UNIT"
[ "$(pending)" = "$queued" ] || fail "the upgrade changed the queue: $(pending) pending, not $queued"
echo "upgrade: ok (config kept, still enabled, $queued pending: $(tr '\n' ';' <"$calls"))"

# --- remove --------------------------------------------------------------------------------
echo "== dpkg -r"
pkg -r "$PKG"
asked "deb-systemd-invoke stop $UNIT"
[ ! -e /usr/bin/aiq-braze-sync ] || fail "dpkg -r left the binary"
[ -e "$CONF" ] || fail "dpkg -r removed the conffile"
$as_root test -d "$PRIVATE" && [ -L "$STATE" ] || fail "dpkg -r removed the queue"
echo "remove: ok (conffile and queue kept)"

# --- reinstall over what remove kept, then purge -------------------------------------------
echo "== dpkg -i (reinstall)"
pkg --force-confold -i "$deb"
never_started
[ "$(pending)" = "$queued" ] || fail "the reinstall does not see the kept queue"
grep -q '^endpoint = "http://127.0.0.1:9"' "$CONF" || fail "the reinstall replaced the operator's $CONF"
not_started

echo "== dpkg -P"
pkg -P "$PKG"
never_started
[ "$(dpkg-query -W -f='${db:Status-Status}' "$PKG" 2>/dev/null || echo not-installed)" = not-installed ] ||
  fail "dpkg -P left the package's record"
[ ! -e "$CONF" ] || fail "dpkg -P left $CONF"
[ ! -L "$WANTS" ] || fail "dpkg -P left the unit enabled"
[ ! -L "/etc/systemd/system/$UNIT" ] || fail "dpkg -P left the unit masked"
$as_root test -d "$PRIVATE" && [ -L "$STATE" ] || fail "dpkg -P removed the queue without being asked"
getent passwd "$PKG" >/dev/null || fail "dpkg -P removed the account"
echo "purge: ok (queue and account kept)"

echo "== dpkg -i, then AIQ_BRAZE_SYNC_PURGE_DATA=yes dpkg -P"
pkg --force-confold -i "$deb" >/dev/null
AIQ_BRAZE_SYNC_PURGE_DATA=yes pkg -P "$PKG"
[ ! -e "$STATE" ] && [ ! -L "$STATE" ] && ! $as_root test -e "$PRIVATE" ||
  fail "AIQ_BRAZE_SYNC_PURGE_DATA=yes dpkg -P left the queue"
echo "purge with data: ok"

echo "test-deb: ok in $((SECONDS - started)) s"
