//! The state file: its round trip, the layouts a binary adopts or
//! refuses, refused contents naming the field, and the recovery decisions
//! from each generation's verdict.

use super::*;

fn generation(number: u64, pid: u32, state: State) -> SavedGeneration {
    SavedGeneration {
        number,
        slot: number as u32 % 8,
        pid,
        start_time: 1000 + u64::from(pid),
        state,
        sockets: vec![u64::from(pid) * 10],
        config_sha256: Some(format!("{pid:064x}")),
    }
}

fn saved(generations: Vec<SavedGeneration>) -> Saved {
    Saved::new(
        vec!["127.0.0.1:80".into()],
        Limits {
            listeners: 1,
            slots: 6,
            sockets_per_slot: 16,
        },
        9,
        generations,
    )
}

#[test]
fn nothing_saved_is_a_fresh_start() {
    assert_eq!(recovery(None, |_| Verdict::Ours), Recovery::Fresh);
}

#[test]
fn a_proven_active_generation_is_adopted_with_its_proven_peers() {
    let s = saved(vec![
        generation(6, 60, State::Exited),
        generation(7, 70, State::Draining),
        generation(8, 80, State::Active),
        generation(9, 90, State::Starting),
        generation(10, 100, State::Draining),
    ]);
    // 7's pid was reused; 100 runs but holds none of its sockets.
    let verdict = |g: &SavedGeneration| match g.pid {
        70 => Verdict::Gone,
        100 => Verdict::Unproven("sleep".into()),
        _ => Verdict::Ours,
    };
    match recovery(Some(&s), verdict) {
        Recovery::Adopt {
            live,
            gone,
            unproven,
        } => {
            assert_eq!(
                live.iter().map(|g| g.number).collect::<Vec<_>>(),
                vec![8, 9]
            );
            assert_eq!(gone.iter().map(|g| g.number).collect::<Vec<_>>(), vec![7]);
            assert_eq!(unproven.len(), 1);
            assert_eq!(unproven[0].0.number, 10);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_unproven_active_generation_is_neither_adopted_nor_stopped() {
    let s = saved(vec![
        generation(3, 30, State::Active),
        generation(4, 40, State::Draining),
    ]);
    let verdict = |g: &SavedGeneration| match g.pid {
        30 => Verdict::Unproven("sleep (holds no socket recorded for it)".into()),
        _ => Verdict::Ours,
    };
    match recovery(Some(&s), verdict) {
        Recovery::Stale {
            ours,
            gone,
            unproven,
        } => {
            assert_eq!(ours.iter().map(|g| g.number).collect::<Vec<_>>(), vec![4]);
            assert!(gone.is_empty());
            assert_eq!(unproven[0].0.number, 3, "left alone");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn state_files_round_trip_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.state.json");
    assert_eq!(load(&path, &path).unwrap(), None);
    let s = saved(vec![generation(8, 80, State::Active)]);
    save(&path, &s).unwrap();
    assert_eq!(load(&path, &path).unwrap(), Some(s));
    assert!(!path.with_extension("json.tmp").exists());
    std::fs::write(&path, b"{garbage").unwrap();
    assert!(
        load(&path, &path)
            .unwrap_err()
            .to_string()
            .contains("not a reloader state file")
    );
}

/// What a newer binary does with what an older one left (and the
/// reverse): adopt the formats it knows, refuse the others by name,
/// never touch the file.
#[test]
fn older_layouts_are_adopted_and_unknown_ones_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.state.json");
    let s = saved(vec![generation(8, 80, State::Active)]);
    assert_eq!(
        (s.version, s.maps_layout),
        (3, crate::steering::MAPS_LAYOUT)
    );
    let write = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut json = serde_json::to_value(&s).unwrap();
        edit(&mut json);
        std::fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
    };
    // Version 2, as the binaries before layouts were recorded wrote it.
    write(&|j| {
        j["version"] = 2.into();
        j.as_object_mut().unwrap().remove("maps_layout");
    });
    let read = load(&path, &path).unwrap().unwrap();
    assert_eq!((read.version, read.maps_layout), (2, 1));
    // A newer format, even one this binary could not parse.
    write(&|j| {
        j["version"] = 4.into();
        j["generations"] = "moved elsewhere".into();
    });
    let error = load(&path, &path).unwrap_err();
    assert!(matches!(error, LoadError::Incompatible { .. }), "{error}");
    assert!(
        error.to_string().contains("state format 4")
            && error.to_string().contains("a newer binary"),
        "{error}"
    );
    write(&|j| j["version"] = 1.into());
    assert!(
        load(&path, &path)
            .unwrap_err()
            .to_string()
            .contains("an older binary")
    );
    // Maps of another layout.
    write(&|j| j["maps_layout"] = 99.into());
    let error = load(&path, &path).unwrap_err().to_string();
    assert!(error.contains("maps have layout 99"), "{error}");
    assert!(path.exists(), "never deleted");
}

#[test]
fn a_version_2_file_without_config_digests_is_still_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.state.json");
    let s = saved(vec![generation(8, 80, State::Active)]);
    let mut json = serde_json::to_value(&s).unwrap();
    json["generations"][0]
        .as_object_mut()
        .unwrap()
        .remove("config_sha256");
    std::fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
    let read = load(&path, &path).unwrap().unwrap();
    assert_eq!(read.generations[0].config_sha256, None);
    assert_eq!(read.generations[0].number, 8);
}

#[test]
fn invalid_state_files_are_refused_naming_the_field() {
    let ok = saved(vec![
        generation(2, 70, State::Draining),
        generation(3, 80, State::Active),
    ]);
    assert_eq!(ok.check(), Ok(()));
    let mut duplicate = ok.clone();
    duplicate.generations[0].number = 3;
    let mut same_slot = ok.clone();
    same_slot.generations[0].slot = same_slot.generations[1].slot;
    let mut slot_99 = ok.clone();
    slot_99.generations[1].slot = 99;
    let mut pid_0 = ok.clone();
    pid_0.generations[1].pid = 0;
    let mut hold = ok.clone();
    hold.hold = Some(SavedHold {
        held: 5,
        successor: 3,
        until_unix_ms: 0,
    });
    for (bad, says) in [
        (duplicate, "generations[1].number is 3, recorded twice"),
        (
            same_slot,
            "generations[1].slot is 3, the slot of live generation 2 too",
        ),
        (
            slot_99,
            "generations[1].slot is 99, but the maps have 6 slots",
        ),
        (pid_0, "generations[1].pid is 0"),
        (hold, "hold.held is 5, a generation not recorded"),
    ] {
        assert_eq!(bad.check(), Err(says.to_owned()));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.state.json");
        save(&path, &bad).unwrap();
        let error = load(&path, Path::new("/shown")).unwrap_err();
        let error = error.to_string();
        assert!(error.starts_with("/shown is invalid: "), "{error}");
        assert!(path.exists(), "nothing deleted");
    }
}

#[test]
fn pin_dirs_differ_per_control_socket() {
    let a = pin_dir("default", Path::new("/run/reloader/default.sock"));
    let b = pin_dir("default", Path::new("/tmp/x/control.sock"));
    assert_ne!(a, b);
    assert!(a.starts_with("/sys/fs/bpf/reloader"));
    assert_eq!(
        a,
        pin_dir("default", Path::new("/run/reloader/default.sock"))
    );
}
