//! The reload machine end to end, unprivileged: real `sleep` processes as
//! servers, loopback sockets as their listeners, the fake steering.

use std::{
    collections::HashMap,
    future::Future,
    net::TcpListener,
    os::{fd::OwnedFd, unix::process::CommandExt},
    process::Command,
    sync::{Arc, Mutex},
    time::Duration,
};

use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid, waitpid};

use super::*;
use crate::{
    config::RunConfig,
    discovery::{Holder, Listener},
    generation::{Generations, State},
    state::{HISTORY, Handle, InstanceState},
    status::ReloadResult,
    steering::fake::FakeSteering,
    supervisor::{Gate, Process, StderrTail},
};

/// Spawns `sleep` processes; those of generations `listens` accepts get
/// one loopback listener per address.
struct FakeHost {
    addresses: usize,
    listens: fn(u64) -> bool,
    sockets: Mutex<HashMap<u32, Vec<TcpListener>>>,
    pids: Arc<Mutex<Vec<u32>>>,
}

impl FakeHost {
    fn new(addresses: usize, listens: fn(u64) -> bool) -> Self {
        Self {
            addresses,
            listens,
            sockets: Mutex::default(),
            pids: Arc::default(),
        }
    }
}

impl Host for FakeHost {
    fn spawn(&self, number: u64, _: Option<&Path>) -> Result<Spawned, ReloadError> {
        let child = Command::new("sleep")
            .arg("60")
            .process_group(0)
            .spawn()
            .expect("spawn sleep");
        let pid = child.id();
        // Never waited through std: the test reaper below owns its exit.
        drop(child);
        self.pids.lock().unwrap().push(pid);
        if (self.listens)(number) {
            let listeners = (0..self.addresses)
                .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
                .collect();
            self.sockets.lock().unwrap().insert(pid, listeners);
        }
        Ok(Spawned {
            process: Process::child(pid).expect("pidfd"),
            stderr: StderrTail::default(),
            gate: Gate::none(),
        })
    }

    async fn scan(&self, pid: u32) -> Result<Scan, ReloadError> {
        let sockets = self.sockets.lock().unwrap();
        let per_address = (0..self.addresses)
            .map(|i| {
                sockets
                    .get(&pid)
                    .map(|l| {
                        vec![(
                            Listener {
                                transport: crate::net::Transport::Tcp,
                                inode: u64::from(pid) * 100 + i as u64,
                                cookie: 0,
                                addr: l[i].local_addr().unwrap(),
                                accept_queue: 0,
                                backlog: 128,
                            },
                            Holder {
                                pid,
                                fd: 3 + i as i32,
                            },
                        )]
                    })
                    .unwrap_or_default()
            })
            .collect();
        Ok(Scan {
            per_address,
            listening: Vec::new(),
        })
    }

    async fn listening(&self) -> Result<std::collections::BTreeSet<u64>, ReloadError> {
        Ok(std::collections::BTreeSet::new())
    }

    fn exited(&self, pid: u32) -> impl Future<Output = ()> + Send + 'static {
        crate::supervisor::exit_of(pid)
    }

    fn copy(&self, scan: &Scan) -> Result<Vec<Vec<FoundSocket>>, ReloadError> {
        let sockets = self.sockets.lock().unwrap();
        Ok(scan
            .per_address
            .iter()
            .enumerate()
            .map(|(i, found)| {
                found
                    .iter()
                    .map(|(socket, holder)| FoundSocket {
                        socket: socket.clone(),
                        holder: *holder,
                        copy: OwnedFd::from(sockets[&holder.pid][i].try_clone().unwrap()),
                    })
                    .collect()
            })
            .collect())
    }
}

/// Reaps the host's processes as the instance's reaper does: record the
/// exit while the zombie holds its pid, then reap.
fn spawn_reaper(handle: Handle, pids: Arc<Mutex<Vec<u32>>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let known: Vec<u32> = pids.lock().unwrap().clone();
            for pid in known {
                let id = Id::Pid(nix::unistd::Pid::from_raw(pid as i32));
                let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
                if let Ok(WaitStatus::Signaled(..) | WaitStatus::Exited(..)) = waitid(id, flags) {
                    handle.update(|s| s.exited(pid, "exited"));
                    let _ = waitpid(nix::unistd::Pid::from_raw(pid as i32), None);
                    pids.lock().unwrap().retain(|p| *p != pid);
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
}

fn instance(listen: &[&str]) -> (Handle, FakeSteering) {
    let fake = FakeSteering::default();
    let handle = Handle::new(InstanceState::new(
        Arc::new(RunConfig::for_tests(listen)),
        RunConfig::for_tests(listen).limits(),
        Box::new(fake.clone()),
        Generations::new(
            RunConfig::for_tests(&["127.0.0.1:1"]).limits().slots,
            HISTORY,
        ),
        HashMap::new(),
        None,
    ));
    (handle, fake)
}

fn stop(handle: &Handle, host: &FakeHost) {
    handle.update(|s| s.begin_stop());
    for pid in host.pids.lock().unwrap().iter() {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(*pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

#[tokio::test(flavor = "current_thread")]
async fn reloads_cut_over_and_drain_one_generation_after_another() {
    let (handle, fake) = instance(&["127.0.0.1:8080", "[::1]:8443"]);
    let host = FakeHost::new(2, |_| true);
    let reaper = spawn_reaper(handle.clone(), host.pids.clone());
    for n in 1..=6u64 {
        let cut = run(&handle, &host, n == 1, None).await.expect("cutover");
        assert_eq!(cut.generation(), n);
        let slot = handle.read(|s| s.generation(n).unwrap().slot);
        assert_eq!(fake.maps().active.get(&0), Some(&slot));
        assert_eq!(fake.maps().active.get(&1), Some(&slot));
        let report = cut.finish(&handle, |_| {}).await;
        assert_eq!(report.result, ReloadResult::Succeeded);
        assert_eq!(report.previous, (n > 1).then(|| n - 1));
        if n > 1 {
            let old = handle.read(|s| s.generation(n - 1).map(|g| g.state));
            assert_eq!(
                old,
                Some(State::Exited),
                "the barrier waits for the old one"
            );
        }
    }
    let status = handle.read(|s| s.status());
    assert_eq!(
        status.reloads_succeeded, 5,
        "the first start is not a reload"
    );
    assert_eq!(status.listeners[0].active_generation, Some(6));
    stop(&handle, &host);
    reaper.abort();
}

#[tokio::test(flavor = "current_thread")]
async fn a_candidate_that_never_listens_is_killed_and_the_old_one_stays_active() {
    let (handle, fake) = instance(&["127.0.0.1:8080"]);
    let host = FakeHost::new(1, |n| n == 1);
    let reaper = spawn_reaper(handle.clone(), host.pids.clone());
    run(&handle, &host, true, None)
        .await
        .unwrap()
        .finish(&handle, |_| {})
        .await;
    let old_slot = handle.read(|s| s.generation(1).unwrap().slot);

    let report = run(&handle, &host, false, None).await.unwrap_err();
    assert_eq!(report.result, ReloadResult::Failed);
    assert_eq!(report.generation, 2);
    let error = report.error.unwrap();
    assert!(
        error.contains("no listening socket for 127.0.0.1:8080"),
        "{error}"
    );
    assert_eq!(handle.read(|s| s.active()), Some(1));
    assert_eq!(fake.maps().active.get(&0), Some(&old_slot));
    let candidate = handle.read(|s| s.generation(2).cloned()).unwrap();
    assert_eq!(candidate.state, State::Failed);
    let pid = candidate.pid.unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        while host.pids.lock().unwrap().contains(&pid) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the candidate was killed");
    assert_eq!(handle.read(|s| s.status().reloads_failed), 1);
    stop(&handle, &host);
    reaper.abort();
}

#[tokio::test(flavor = "current_thread")]
async fn a_failed_cutover_is_a_failed_reload_with_the_old_generation_active() {
    let (handle, fake) = instance(&["127.0.0.1:8080", "127.0.0.1:8443"]);
    let host = FakeHost::new(2, |_| true);
    let reaper = spawn_reaper(handle.clone(), host.pids.clone());
    run(&handle, &host, true, None)
        .await
        .unwrap()
        .finish(&handle, |_| {})
        .await;
    let old_slot = handle.read(|s| s.generation(1).unwrap().slot);
    fake.maps().fail_set_active.insert(1);
    let report = run(&handle, &host, false, None).await.unwrap_err();
    assert!(
        report
            .error
            .unwrap()
            .contains("127.0.0.1:8443: cutover failed")
    );
    assert_eq!(fake.maps().active.get(&0), Some(&old_slot));
    assert_eq!(handle.read(|s| s.active()), Some(1));
    stop(&handle, &host);
    reaper.abort();
}

#[tokio::test(flavor = "current_thread")]
async fn a_stop_during_a_start_kills_the_candidate() {
    let (handle, _fake) = instance(&["127.0.0.1:8080"]);
    let host = Arc::new(FakeHost::new(1, |_| false));
    let reaper = spawn_reaper(handle.clone(), host.pids.clone());
    let task = {
        let (handle, host) = (handle.clone(), host.clone());
        tokio::spawn(async move { run(&handle, &*host, true, None).await })
    };
    // Wait until the candidate runs, then stop as the run loop does.
    tokio::time::timeout(Duration::from_secs(5), async {
        while handle
            .read(|s| s.generation(1).and_then(|g| g.pid))
            .is_none()
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .expect("spawned");
    task.abort();
    let live = handle.update(|s| s.begin_stop());
    assert_eq!(live, vec![(1, State::Starting)]);
    assert_eq!(
        handle.read(|s| s.generation(1).unwrap().state),
        State::Failed
    );
    tokio::time::timeout(Duration::from_secs(5), async {
        while !host.pids.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the candidate's process was killed");
    reaper.abort();
}
