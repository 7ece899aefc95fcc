//! The command line as a whole: `run` lines becoming a
//! [`crate::config::RunConfig`] or refused, the `--` tip, the internal
//! subcommands kept out of help, completions and man pages, and
//! `--log-format` belonging to `run` only.

use super::*;
use crate::config::RunConfig;

fn parse(args: &[&str]) -> Result<RunConfig, String> {
    let cli = Cli::try_parse_from(args).map_err(|e| e.to_string())?;
    match cli.command {
        Command::Run(run) => run.into_config().map_err(|e| e.to_string()),
        _ => Err("not run".into()),
    }
}

/// A forgotten `--` before the server command gets a tip with the
/// command line fixed (issue 29: clap's "unexpected argument 'nginx'"
/// alone did not say what was wrong).
#[test]
fn a_server_command_without_the_separator_gets_a_tip() {
    let args = |words: &[&str]| words.iter().map(std::ffi::OsString::from).collect();
    let error = Cli::try_parse_with_tips(args(&[
        "reloader",
        "run",
        "--listen",
        "127.0.0.1:80",
        "nginx",
        "-g",
        "daemon off;",
    ]))
    .unwrap_err();
    assert_eq!(error.kind(), clap::error::ErrorKind::UnknownArgument);
    let text = error.to_string();
    assert!(
        text.contains(
            "tip: the server command goes after `--` (what comes before it is reloader's): \
             reloader run --listen 127.0.0.1:80 -- nginx -g 'daemon off;'"
        ),
        "{text}"
    );
    // Other mistakes get no such tip.
    for words in [
        &[
            "reloader",
            "run",
            "--listen",
            "127.0.0.1:80",
            "--bogus",
            "--",
            "x",
        ][..],
        &["reloader", "status", "extra"],
        &[
            "reloader",
            "run",
            "--listen",
            "127.0.0.1:80",
            "--",
            "x",
            "--",
            "y",
        ],
    ] {
        if let Err(error) = Cli::try_parse_with_tips(args(words)) {
            assert!(
                !error.to_string().contains("goes after"),
                "{words:?}: {error}"
            );
        }
    }
}

#[test]
fn a_full_run_command_line() {
    let config = parse(&[
        "reloader",
        "run",
        "--name",
        "edge",
        "--listen",
        "127.0.0.1:8080",
        "--listen",
        "[::]:8443",
        "--drain-signal",
        "QUIT",
        "--drain-timeout",
        "2m",
        "--ready-probe",
        "http://127.0.0.1:8080/health",
        "--",
        "nginx",
        "-g",
        "daemon off;",
    ])
    .unwrap();
    assert_eq!(config.name, "edge");
    assert_eq!(config.listen.len(), 2);
    assert_eq!(config.drain.timeout, Duration::from_secs(120));
    assert_eq!(config.spawn.command, vec!["nginx", "-g", "daemon off;"]);
    assert!(config.ready.probe.is_some());
}

#[test]
fn config_paths_default_to_the_watched_ones() {
    let base = ["reloader", "run", "--listen", "127.0.0.1:80"];
    let with = |extra: &[&str]| {
        let mut v: Vec<&str> = base.to_vec();
        v.extend_from_slice(extra);
        v.extend_from_slice(&["--", "x"]);
        parse(&v).unwrap()
    };
    let c = with(&["--watch", "/etc/nginx", "--watch", "/etc/ssl/x.pem"]);
    assert_eq!(c.changes.config_files, c.changes.watch);
    assert_eq!(c.changes.watch.len(), 2);
    let c = with(&["--watch", "/etc/nginx", "--config", "/etc/nginx/nginx.conf"]);
    assert_eq!(
        c.changes.config_files,
        vec![PathBuf::from("/etc/nginx/nginx.conf")]
    );
    let c = with(&["--check", "nginx -t -g 'pid /run/{generation}.pid;'"]);
    assert_eq!(
        c.changes.check.unwrap().argv[3],
        "pid /run/{generation}.pid;"
    );
    assert!(with(&[]).changes.config_files.is_empty() && with(&[]).changes.check.is_none());
}

/// The internal subcommands (`__exec`, `__keeper`, `__serve`) were
/// offered by every shell's completions and listed in `man`.
#[test]
fn internal_commands_show_nowhere_a_user_looks() {
    let mut help = Vec::new();
    command().write_long_help(&mut help).unwrap();
    let help = String::from_utf8(help).unwrap();
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut command(), "reloader", &mut script);
        let script = String::from_utf8(script).unwrap();
        assert!(script.contains("handover"), "{shell}: {script}");
        for text in [&script, &help] {
            for internal in ["__exec", "__keeper", "__serve"] {
                assert!(!text.contains(internal), "{shell}: {internal} in {text}");
            }
        }
        // A hidden option (for tests) is left out of the help; bash's
        // completions (clap_complete) list hidden options too.
        assert!(!help.contains("force-select-only"));
    }
    let dir = tempfile::tempdir().unwrap();
    let pages = write_man_pages(dir.path()).unwrap();
    let mut names: Vec<String> = pages
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "reloader-completions.1",
            "reloader-demo.1",
            "reloader-fleet-status.1",
            "reloader-fleet-wait.1",
            "reloader-fleet.1",
            "reloader-handover.1",
            "reloader-list.1",
            "reloader-man.1",
            "reloader-promote.1",
            "reloader-reload.1",
            "reloader-rollback.1",
            "reloader-run.1",
            "reloader-status.1",
            "reloader-stop.1",
            "reloader.1",
        ]
    );
    for page in &pages {
        let roff = std::fs::read_to_string(page).unwrap();
        for internal in ["\\_\\_", "__", "force\\-select"] {
            assert!(!roff.contains(internal), "{}: {roff}", page.display());
        }
    }
    let run = std::fs::read_to_string(dir.path().join("reloader-run.1")).unwrap();
    assert!(run.contains("drain\\-signal"), "{run}");
    // The internal ones still parse, apart.
    let internal = Internal::try_parse_from(["reloader", "__keeper", "--socket", "/x"]);
    assert!(matches!(internal, Ok(Internal::Keeper { .. })));
    assert!(Cli::try_parse_from(["reloader", "__keeper", "--socket", "/x"]).is_err());
}

/// `--log-format` was a global flag that `status` or `stop` accepted
/// and ignored.
#[test]
fn log_format_is_an_option_of_run_only() {
    let cli = Cli::try_parse_from([
        "reloader",
        "run",
        "--log-format",
        "json",
        "--listen",
        "127.0.0.1:80",
        "--",
        "x",
    ])
    .unwrap();
    assert_eq!(cli.log_format(), LogFormat::Json);
    let error = Cli::try_parse_from(["reloader", "status", "--log-format", "json"])
        .unwrap_err()
        .to_string();
    assert!(error.contains("--log-format"), "{error}");
    let cli = Cli::try_parse_from(["reloader", "handover", "--name", "web"]).unwrap();
    assert_eq!(cli.log_format(), LogFormat::Text);
}

#[test]
fn bad_command_lines_are_refused_before_anything_starts() {
    let base = ["reloader", "run", "--listen", "127.0.0.1:80"];
    let with = |extra: &[&str]| {
        let mut v: Vec<&str> = base.to_vec();
        v.extend_from_slice(extra);
        parse(&v).unwrap_err()
    };
    assert!(with(&[]).contains("no server command"));
    assert!(with(&["--drain-signal", "NOPE", "--", "x"]).contains("not a signal"));
    assert!(with(&["--drain-timeout", "0s", "--", "x"]).contains("at least"));
    assert!(with(&["--ready-timeout", "forever", "--", "x"]).contains("durations like"));
    assert!(with(&["--max-draining", "0", "--", "x"]).contains("--max-draining"));
    assert!(with(&["--max-draining", "99", "--", "x"]).contains("--max-draining"));
    assert!(with(&["--listen", "127.0.0.1:80", "--", "x"]).contains("twice"));
    assert!(with(&["--name", "../x", "--", "x"]).contains("--name"));
    assert!(with(&["--ready-probe", "tcp://127.0.0.1:81", "--", "x"]).contains("--listen"));
    assert!(with(&["--check", "nginx -t 'oops", "--", "x"]).contains("--check"));
    assert!(
        parse(&["reloader", "run", "--", "x"])
            .unwrap_err()
            .contains("--listen")
    );
}
