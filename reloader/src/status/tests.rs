//! The human forms of the reports.

use super::{ReloadReport, ReloadResult};

#[test]
fn reload_reports_name_the_config_and_what_a_check_refused() {
    let done = ReloadReport {
        generation: 3,
        previous: Some(2),
        result: ReloadResult::Succeeded,
        config_sha256: Some("ab".repeat(32)),
        ..ReloadReport::default()
    };
    assert!(
        done.human()
            .starts_with("generation 3 active (replaced 2): ")
    );
    assert!(
        done.human()
            .ends_with(&format!("; config sha256 {}", "ab".repeat(32)))
    );
    let refused = ReloadReport {
        generation: 3,
        previous: Some(2),
        error: Some(
            "--check `nginx -t` exited with status 1: nothing was started; it printed:\n  bad"
                .into(),
        ),
        stderr_tail: vec!["bad".into()],
        check_failed: true,
        ..ReloadReport::default()
    };
    assert_eq!(
        refused.human(),
        "reload to generation 3 failed (generation 2 is still active): --check `nginx -t` \
         exited with status 1: nothing was started; it printed:\n  bad",
        "the output once, after what still runs"
    );
    let failed = ReloadReport {
        check_failed: false,
        ..refused.clone()
    };
    assert!(
        failed
            .human()
            .contains("; generation 2 is still active\nlast stderr lines")
    );
}
