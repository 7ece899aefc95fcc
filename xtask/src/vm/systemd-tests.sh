#!/bin/bash
# The systemd VM's tests (`cargo xtask systemd-test`): run by the unit
# reloader-vm-tests.service once the guest's systemd (PID 1) has reached
# multi-user.target. Results go to the serial console in the runner's
# format (`test NAME ... ok|FAILED`, `@@` markers); then the guest powers
# off. Each test prints what it checked and, on failure, the unit's journal.
#
# /vm holds what the runner put in: the packages (v1/ and v2/, v2 a higher
# version of the same build), the load client, and the settings below.
set -u
. /vm/settings # LOAD_SECONDS

NAME=nginx
UNIT=reloader@$NAME.service
CONF=/etc/nginx/$NAME.conf
FAILED=0

journal() {
    echo "--- journal of $UNIT (last 40 lines)"
    journalctl -u "$UNIT" --no-pager -o short-monotonic -n 40 | sed 's/^/  | /'
}

fail() {
    echo "FAIL: $*"
    journal
    return 1
}

run_test() {
    local name=$1
    echo "--- $name"
    if "$name"; then
        echo "test $name ... ok"
    else
        echo "test $name ... FAILED"
        FAILED=1
    fi
}

# nginx with `reuseport` on port 80 (both families, as the unit's --listen
# says), answering "config $1".
nginx_config() {
    cat >"$CONF" <<EOF
user www-data;
worker_processes 2;
error_log stderr;
pid /run/nginx-reloader.pid;
events { worker_connections 1024; }
http {
    access_log off;
    server {
        listen 80 reuseport;
        listen [::]:80 reuseport;
        location / { return 200 "config $1\n"; }
    }
}
EOF
}

status_json() { reloader status --name "$NAME" --json; }
active_generation() { status_json | jq -r '.generations[] | select(.state == "active") | .generation'; }
active_pid() { status_json | jq -r '.generations[] | select(.state == "active") | .pid'; }
main_pid() { systemctl show -P MainPID "$UNIT"; }
nginx_pids() { pgrep -x nginx | sort -n | tr '\n' ' '; }
# Whether a controller other than pid $1 is the unit's main process.
controller_replaced() {
    local now
    now=$(main_pid)
    [ "$now" != "$1" ] && [ "$now" != 0 ]
}

# Waits up to $1 seconds for the command after it to succeed.
wait_until() {
    local seconds=$1
    shift
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || return 1
        sleep 0.2
    done
}

# Starts the load client in the background: new connections to port 80
# for LOAD_SECONDS (it stops by itself); `load_finish` checks it.
load_start() {
    rm -f /tmp/load.out /tmp/load.err
    loadgen --addr 127.0.0.1:80 --concurrency 4 --max-duration-s "$LOAD_SECONDS" \
        --out /tmp/load.out 2>/tmp/load.err &
    LOAD_PID=$!
    sleep 1
}

# Stops the load (SIGTERM ends it early) and fails unless it made enough
# connections and none failed.
load_finish() {
    kill -TERM "$LOAD_PID" 2>/dev/null
    wait "$LOAD_PID"
    local summary
    summary=$(cat /tmp/load.err)
    echo "load: $summary"
    local total failed
    total=$(sed -n 's/^loadgen: \([0-9]*\) connections.*/\1/p' /tmp/load.err)
    failed=$(sed -n 's/^loadgen: [0-9]* connections, \([0-9]*\) failed.*/\1/p' /tmp/load.err)
    echo "@@MEASURE $1 connections=${total:-?} failed=${failed:-?}"
    [ -n "$total" ] && [ "$total" -ge 50 ] || { fail "too little load to prove anything: $summary"; return 1; }
    [ "$failed" = 0 ] || { fail "$failed connections failed: $summary"; return 1; }
}

# ---- The tests, in order: each builds on the state the previous left.

the_package_installs_with_dpkg() {
    dpkg -i /vm/v1/reloader_*.deb || return 1
    reloader --version || return 1
    for f in /usr/bin/reloader /usr/lib/systemd/system/reloader@.service \
        /usr/share/man/man1/reloader.1.gz /usr/share/man/man1/reloader-run.1.gz \
        /usr/share/man/man1/reloader-handover.1.gz \
        /usr/share/bash-completion/completions/reloader \
        /usr/share/zsh/vendor-completions/_reloader \
        /usr/share/fish/vendor_completions.d/reloader.fish; do
        [ -e "$f" ] || { echo "FAIL: $f is not installed"; return 1; }
    done
    systemctl cat "$UNIT" >/dev/null || { echo "FAIL: systemd does not know $UNIT"; return 1; }
    if systemctl is-active --quiet "$UNIT"; then
        echo "FAIL: installing started $UNIT"
        return 1
    fi
}

systemctl_start_serves() {
    nginx_config v1
    systemctl start "$UNIT" || { fail "systemctl start failed"; return 1; }
    # Type=notify: start returned once the first generation was active.
    local v4 v6
    v4=$(curl -sf http://127.0.0.1/)
    v6=$(curl -sf 'http://[::1]/')
    echo "IPv4: $v4, IPv6: $v6, controller pid $(main_pid), nginx $(nginx_pids)"
    [ "$v4" = "config v1" ] && [ "$v6" = "config v1" ] || { fail "not served"; return 1; }
    [ "$(active_generation)" = 1 ] || { fail "generation 1 is not active"; return 1; }
    reloader status --name "$NAME"
    echo "@@STEERING $(status_json | jq -r .steering)"
}

delegate_gives_reloader_its_cgroup() {
    local cgroup dir
    [ "$(systemctl show -P Delegate "$UNIT")" = yes ] || { fail "Delegate is not yes"; return 1; }
    cgroup=$(systemctl show -P ControlGroup "$UNIT")
    dir=/sys/fs/cgroup$cgroup
    echo "unit cgroup $cgroup: controllers '$(cat "$dir/cgroup.controllers")'"
    # reloader arranges the subtree: the controller in a leaf of its own,
    # each generation (every nginx process) in a cgroup of its own, all
    # below the unit's.
    local own pid in
    own=$(sed -n 's/^0:://p' "/proc/$(main_pid)/cgroup")
    echo "controller in $own; generation 1 in $(status_json | jq -r '.generations[0].cgroup')"
    case "$own" in "$cgroup"/*) ;; *) fail "the controller is in $own, not below $cgroup"; return 1 ;; esac
    # The unit's own cgroup enables no controller for its children: systemd
    # puts the next controller there (a restart, a hand-over), and cgroup v2
    # refuses a process in a cgroup that does (219/CGROUP).
    [ -z "$(cat "$dir/cgroup.subtree_control")" ] ||
        { fail "$dir enables controllers: $(cat "$dir/cgroup.subtree_control")"; return 1; }
    for pid in $(pgrep -x nginx); do
        in=$(sed -n 's/^0:://p' "/proc/$pid/cgroup")
        case "$in" in
        "$cgroup"/reloader.*/gen-1) ;;
        *) fail "nginx $pid is in $in, not in generation 1's cgroup below $cgroup"; return 1 ;;
        esac
    done
    # systemd marks a delegated cgroup (v252+) and hands it the controllers.
    [ "$(getfattr --only-values -n trusted.delegate "$dir" 2>/dev/null)" = 1 ] ||
        { fail "$dir is not marked delegated (trusted.delegate)"; return 1; }
    for c in memory pids; do
        grep -qw "$c" "$dir/cgroup.controllers" || { fail "controller $c is not delegated"; return 1; }
    done
    # A cgroup reloader makes below its own stays through a daemon-reload
    # (systemd does not manage a delegated subtree).
    mkdir "$dir/delegation-probe" || { fail "cannot create a cgroup below $dir"; return 1; }
    systemctl daemon-reload
    [ -d "$dir/delegation-probe" ] || { fail "systemd removed the delegated cgroup"; return 1; }
    rmdir "$dir/delegation-probe"
}

systemctl_reload_is_reload_wait() {
    local before
    before=$(active_pid)
    nginx_config v2
    systemctl reload "$UNIT" || { fail "systemctl reload failed"; return 1; }
    # It waited for the barrier: the new generation serves, the old exited.
    [ "$(curl -sf http://127.0.0.1/)" = "config v2" ] || { fail "config v2 is not served"; return 1; }
    [ "$(active_generation)" = 2 ] || { fail "generation 2 is not active"; return 1; }
    if kill -0 "$before" 2>/dev/null; then
        fail "the old generation (pid $before) still runs after systemctl reload returned"
        return 1
    fi
    # A broken configuration: nginx -t (--check) refuses it, and the reload
    # fails with nginx's own error; the running generation keeps serving.
    cat >"$CONF" <<EOF
events {}
http { server { listen 80 reuseport; this_is_not_a_directive; } }
EOF
    if systemctl reload "$UNIT"; then
        fail "systemctl reload succeeded with a broken config"
        return 1
    fi
    journalctl -u "$UNIT" --no-pager -n 20 | grep -m1 "this_is_not_a_directive" ||
        { fail "the journal does not show nginx's error"; return 1; }
    [ "$(curl -sf http://127.0.0.1/)" = "config v2" ] || { fail "generation 2 stopped serving"; return 1; }
    [ "$(active_generation)" = 2 ] || { fail "generation 2 is no longer active"; return 1; }
    systemctl is-active --quiet "$UNIT" || { fail "a failed reload stopped the unit"; return 1; }
    nginx_config v2
}

a_killed_controller_is_restarted_and_adopts_under_load() {
    local old_main nginx restarts
    old_main=$(main_pid)
    nginx=$(nginx_pids)
    restarts=$(systemctl show -P NRestarts "$UNIT")
    load_start
    systemctl kill -s KILL --kill-whom=main "$UNIT"
    # Restart=on-failure, RestartSec=1s: a new controller adopts nginx.
    wait_until 60 controller_replaced "$old_main" ||
        { fail "systemd did not restart the controller"; return 1; }
    wait_until 60 reloader status --name "$NAME" || { fail "the new controller does not answer"; return 1; }
    sleep 2
    load_finish killed-controller || return 1
    echo "controller $old_main -> $(main_pid), restarts $restarts -> $(systemctl show -P NRestarts "$UNIT")"
    echo "nginx before: $nginx; after: $(nginx_pids)"
    [ "$(nginx_pids)" = "$nginx" ] || { fail "nginx processes changed"; return 1; }
    status_json | jq -r .recovered | grep -q '^adopted generations 2 (active' ||
        { fail "not adopted: $(status_json | jq -r .recovered)"; return 1; }
    [ "$(curl -sf http://127.0.0.1/)" = "config v2" ] || { fail "not served"; return 1; }
}

an_upgrade_hands_over_without_touching_nginx() {
    local old_main nginx
    old_main=$(main_pid)
    nginx=$(nginx_pids)
    load_start
    dpkg -i /vm/v2/reloader_*.deb || { fail "dpkg -i of the newer package failed"; return 1; }
    # The postinst handed over and waited for the successor (--wait).
    sleep 2
    load_finish upgrade || return 1
    echo "package $(dpkg-query -W -f '${Version}' reloader); controller $old_main -> $(main_pid)" \
        "($(readlink "/proc/$(main_pid)/exe")); nginx before: $nginx; after: $(nginx_pids)"
    [ "$(dpkg-query -W -f '${Version}' reloader)" = "$(cat /vm/v2/version)" ] ||
        { fail "the newer package is not installed"; return 1; }
    [ "$(main_pid)" != "$old_main" ] || { fail "the controller was not replaced"; return 1; }
    # The new binary runs: the old one's file was replaced by dpkg, so a
    # process still running it would show "/usr/bin/reloader (deleted)".
    [ "$(readlink "/proc/$(main_pid)/exe")" = /usr/bin/reloader ] ||
        { fail "the controller does not run the installed binary"; return 1; }
    [ "$(nginx_pids)" = "$nginx" ] || { fail "nginx processes changed"; return 1; }
    journalctl -u "$UNIT" --no-pager | grep -q "handed over" || { fail "no hand-over in the journal"; return 1; }
    systemctl is-active --quiet "$UNIT" || { fail "the unit is not active"; return 1; }
    # The new controller reloads as before.
    nginx_config v3
    systemctl reload "$UNIT" || { fail "reload after the upgrade failed"; return 1; }
    [ "$(curl -sf http://127.0.0.1/)" = "config v3" ] || { fail "config v3 is not served"; return 1; }
}

systemctl_stop_drains() {
    local state pins
    systemctl stop "$UNIT" || { fail "systemctl stop failed"; return 1; }
    # reloader exited 0 only if every generation exited within its drain
    # timeout (QUIT, nginx's graceful stop); nothing of the instance is left.
    echo "result $(systemctl show -P Result "$UNIT"), exit status $(systemctl show -P ExecMainStatus "$UNIT")"
    [ "$(systemctl show -P ExecMainStatus "$UNIT")" = 0 ] || { fail "the stop was not clean"; return 1; }
    [ -z "$(nginx_pids)" ] || { fail "nginx still runs: $(nginx_pids)"; return 1; }
    journalctl -u "$UNIT" --no-pager | grep -q "stopping: draining every generation" ||
        { fail "no drain in the journal"; return 1; }
    state=$(ls /run/reloader/ 2>/dev/null)
    pins=$(ls /sys/fs/bpf/reloader/ 2>/dev/null)
    [ -z "$state$pins" ] || { fail "left behind: /run/reloader: $state; pins: $pins"; return 1; }
    if curl -sf --max-time 2 http://127.0.0.1/ >/dev/null; then
        fail "port 80 still answers"
        return 1
    fi
}

echo "@@KERNEL $(uname -r)"
echo "systemd $(systemctl --version | head -1), nginx $(nginx -v 2>&1)"
depmod -a
modprobe tcp_diag
modprobe udp_diag
echo "@@MODULES $(cut -d' ' -f1 /proc/modules | tr '\n' ' ')"
echo "@@BEGIN systemd"
started=$SECONDS
run_test the_package_installs_with_dpkg
run_test systemctl_start_serves
run_test delegate_gives_reloader_its_cgroup
run_test systemctl_reload_is_reload_wait
run_test a_killed_controller_is_restarted_and_adopts_under_load
run_test an_upgrade_hands_over_without_touching_nginx
run_test systemctl_stop_drains
echo "tests took $((SECONDS - started))s"
echo "@@END systemd $FAILED"
echo "@@ALLDONE"
