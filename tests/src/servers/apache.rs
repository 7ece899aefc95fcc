//! Apache 2.4 (Debian's apache2), event MPM, started directly
//! (`/usr/sbin/apache2 -f CONF -DFOREGROUND`, no apache2ctl, no
//! /etc/apache2/envvars: the config sets everything those would). With
//! `ListenCoresBucketsRatio 1` Apache opens one `SO_REUSEPORT` listener per
//! bucket (online CPUs ÷ ratio) and each child process accepts from its
//! bucket's listener, so there are as many children as buckets here. The
//! parent (root) binds; children run as `nobody` and read the config
//! directory, which is therefore world-readable. Graceful stop: `WINCH`.
//! mod_lua answers with the generation (environment) and the child's pid.

use super::{Answerers, Server, probe_options, require, shared_tempdir, version_of, write};

const APACHE: &str = "/usr/sbin/apache2";
const MODULES: &str = "/usr/lib/apache2/modules";

const HANDLER: &str = r#"function handle(r)
  local stat = io.open("/proc/self/stat")
  local pid = stat:read("*n")
  stat:close()
  r.content_type = "text/plain"
  r:puts("gen=" .. os.getenv("RELOADER_GENERATION") .. " pid=" .. pid .. "\n")
  return apache2.OK
end
"#;

pub fn server(addr: &str) -> Server {
    require(APACHE.as_ref(), "Apache 2.4 (Debian's apache2)");
    let dir = shared_tempdir();
    let d = dir.path().display().to_string();
    let handler = write(dir.path(), "gen.lua", HANDLER);
    let buckets = std::thread::available_parallelism().map_or(1, usize::from);
    let threads = 16;
    let config = write(
        dir.path(),
        "apache2.conf",
        &format!(
            "ServerRoot {d}\n\
             LoadModule mpm_event_module {MODULES}/mod_mpm_event.so\n\
             LoadModule authz_core_module {MODULES}/mod_authz_core.so\n\
             LoadModule lua_module {MODULES}/mod_lua.so\n\
             PidFile {d}/apache-${{RELOADER_GENERATION}}.pid\n\
             Mutex file:{d} default\n\
             ErrorLog /dev/stderr\n\
             LogLevel notice\n\
             ServerName localhost\n\
             User nobody\n\
             Group nogroup\n\
             Listen {addr}\n\
             ListenCoresBucketsRatio 1\n\
             StartServers {buckets}\n\
             ServerLimit {buckets}\n\
             ThreadsPerChild {threads}\n\
             MaxRequestWorkers {}\n\
             MinSpareThreads 1\n\
             MaxSpareThreads {}\n\
             MaxConnectionsPerChild 0\n\
             DocumentRoot {d}\n\
             LuaMapHandler ^/ {handler} handle\n",
            buckets * threads,
            buckets * threads,
        ),
    );
    Server {
        name: format!("Apache event MPM ({buckets} children, ListenCoresBucketsRatio 1)"),
        version: version_of(APACHE, &["-v"]),
        command: vec![APACHE.into(), "-f".into(), config, "-DFOREGROUND".into()],
        options: probe_options("WINCH", addr),
        env: Vec::new(),
        answerers: Answerers::Children { threads: 1 },
        label: None,
        dir,
    }
}
