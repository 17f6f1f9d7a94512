//! `tollgate demo`: three regional gateways and the airline services on one machine, with
//! nothing but the repository and cargo.
//!
//! Every role runs as a child process of this same executable, so each has its own process,
//! logs and service name, exactly as in a real deployment. Storage: with `--redis URL`, or
//! when `redis-server` is on PATH (started here on a free port and stopped on exit), two
//! instances of each service share Redis; otherwise each service runs once with the embedded
//! in-memory store, which cannot be shared between processes.
//!
//! The gateways gossip their global limits over QUIC on loopback (UDP 7401-7403), with a
//! deployment CA and region certificates generated into the demo's directory at start.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// The region files shipped in `regions/`, embedded so the demo runs from any directory.
const REGIONS: [(&str, &str, u16, u16); 3] = [
    (
        "us-east",
        include_str!("../regions/us-east.toml"),
        8081,
        9081,
    ),
    (
        "eu-west",
        include_str!("../regions/eu-west.toml"),
        8082,
        9082,
    ),
    (
        "ap-south",
        include_str!("../regions/ap-south.toml"),
        8083,
        9083,
    ),
];
const USERS_PORTS: [u16; 2] = [7001, 7002];
const BOOKINGS_PORTS: [u16; 2] = [7101, 7102];
/// How long everything gets to become ready.
const STARTUP_DEADLINE: Duration = Duration::from_secs(30);
/// How long a child gets to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Use this Redis (redis://host:port) for the services and gateways instead of starting one.
    #[arg(long, conflicts_with = "no_redis")]
    pub redis: Option<String>,
    /// Never start redis-server: use the embedded in-memory store.
    #[arg(long)]
    pub no_redis: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("port {port} is already in use (is another demo running?)")]
    PortInUse { port: u16 },
    #[error("cannot find this executable to start the roles: {0}")]
    CurrentExe(std::io::Error),
    #[error("cannot start {role}: {source}")]
    Spawn {
        role: String,
        source: std::io::Error,
    },
    #[error("cannot write the demo configs to {}: {source}", dir.display())]
    WriteConfig {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot generate the gossip certificates: {0}")]
    Certs(#[from] crate::certs::CertsError),
    #[error("cannot prepare the {region} config: {reason}")]
    Config { region: String, reason: String },
    #[error("{role} did not become ready within {STARTUP_DEADLINE:?}")]
    NotReady { role: String },
    #[error("{role} exited unexpectedly ({status})")]
    ChildExited { role: String, status: String },
}

/// A started child process and the role it plays.
struct Role {
    name: String,
    child: Child,
}

/// Where the services keep their data.
enum Storage {
    /// A redis-server the demo started and owns.
    Owned {
        url: String,
    },
    /// A Redis the user gave.
    External {
        url: String,
    },
    Memory,
}

impl Storage {
    fn url(&self) -> Option<&str> {
        match self {
            Self::Owned { url } | Self::External { url } => Some(url),
            Self::Memory => None,
        }
    }
}

pub async fn run(
    args: DemoArgs,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    hangups: crate::shutdown::Hangups,
) -> Result<(), DemoError> {
    let exe = std::env::current_exe().map_err(DemoError::CurrentExe)?;
    let mut roles: Vec<Role> = Vec::new();
    let mut logs = JoinSet::new();
    let dir = std::env::temp_dir().join(format!("tollgate-demo-{}", std::process::id()));
    let result = start_and_wait(&exe, &args, &dir, &mut roles, &mut logs, shutdown, hangups).await;
    stop_all(&mut roles).await;
    let _ = std::fs::remove_dir_all(&dir);
    logs.shutdown().await;
    result
}

async fn start_and_wait(
    exe: &Path,
    args: &DemoArgs,
    dir: &Path,
    roles: &mut Vec<Role>,
    logs: &mut JoinSet<()>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    mut hangups: crate::shutdown::Hangups,
) -> Result<(), DemoError> {
    let storage = choose_storage(args, roles, logs).await?;
    let replicas = if storage.url().is_some() { 2 } else { 1 };
    let users_ports = &USERS_PORTS[..replicas];
    let bookings_ports = &BOOKINGS_PORTS[..replicas];
    for port in REGIONS
        .iter()
        .flat_map(|(_, _, port, admin)| [*port, *admin])
        .chain(users_ports.iter().copied())
        .chain(bookings_ports.iter().copied())
    {
        ensure_free(port)?;
    }

    let service_redis = storage.url().map(|url| with_db(url, 0));
    for (i, port) in users_ports.iter().enumerate() {
        let mut command = role_command(exe, "users");
        command.args(["users", "--listen", &format!("127.0.0.1:{port}")]);
        if let Some(url) = &service_redis {
            command.args(["--redis", url]);
        }
        spawn(roles, logs, format!("users-{}", i + 1), command)?;
    }
    for (i, port) in bookings_ports.iter().enumerate() {
        let mut command = role_command(exe, "bookings");
        command.args([
            "bookings",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--users-url",
            &format!("http://127.0.0.1:{}", users_ports[i]),
        ]);
        if let Some(url) = &service_redis {
            command.args(["--redis", url]);
        }
        spawn(roles, logs, format!("bookings-{}", i + 1), command)?;
    }

    std::fs::create_dir_all(dir).map_err(|source| DemoError::WriteConfig {
        dir: dir.to_owned(),
        source,
    })?;
    // The region files name `certs/<region>.<instance>.pem` relative to themselves; the demo
    // runs instance `a` of each region.
    let gateways = REGIONS
        .iter()
        .map(|(region, ..)| crate::certs::Gateway::new(region, crate::certs::DEFAULT_INSTANCE))
        .collect::<Result<Vec<_>, _>>()?;
    crate::certs::generate(&dir.join("certs"), &gateways, true)?;
    for (db, (region, text, _, _)) in (1..).zip(REGIONS) {
        let config = region_config(
            region,
            text,
            users_ports,
            bookings_ports,
            storage.url().map(|url| with_db(url, db)).as_deref(),
        )?;
        let path = dir.join(format!("{region}.toml"));
        std::fs::write(&path, config).map_err(|source| DemoError::WriteConfig {
            dir: dir.to_owned(),
            source,
        })?;
        let mut command = role_command(exe, "gateway");
        command.arg("gateway").arg("--config").arg(&path);
        // The file's redis_url is already the demo's; an inherited override must not win.
        command.env_remove(crate::config::ENV_REDIS_URL);
        command.env_remove(crate::config::ENV_LISTEN);
        command.env_remove(crate::config::ENV_ADMIN_LISTEN);
        for var in [
            crate::config::ENV_GOSSIP_LISTEN,
            crate::config::ENV_GOSSIP_PEERS,
            crate::config::ENV_GOSSIP_CERTS,
            crate::config::ENV_INSTANCE,
        ] {
            command.env_remove(var);
        }
        for service in ["users", "bookings"] {
            command.env_remove(crate::config::service_instances_env(service));
        }
        spawn(roles, logs, region.to_owned(), command)?;
    }

    let deadline = Instant::now() + STARTUP_DEADLINE;
    for (region, _, _, admin) in REGIONS {
        wait_ready(roles, region, admin, deadline).await?;
    }
    print_banner(&storage, users_ports, bookings_ports, dir);

    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            (role, status) = first_exit(roles) => {
                return Err(DemoError::ChildExited { role, status });
            }
            true = hangups.recv() => reload_gateways(roles),
        }
    }
}

/// Passes a SIGHUP on to every gateway: each reloads its region file (in the demo's
/// directory, which the banner names).
fn reload_gateways(roles: &[Role]) {
    for role in roles
        .iter()
        .filter(|role| REGIONS.iter().any(|(region, ..)| *region == role.name))
    {
        if let Some(pid) = role.child.id()
            && let Ok(pid) = i32::try_from(pid)
        {
            let _ = kill(Pid::from_raw(pid), Signal::SIGHUP);
        }
    }
    tracing::info!("SIGHUP passed on to the gateways");
}

async fn choose_storage(
    args: &DemoArgs,
    roles: &mut Vec<Role>,
    logs: &mut JoinSet<()>,
) -> Result<Storage, DemoError> {
    if let Some(url) = &args.redis {
        return Ok(Storage::External { url: url.clone() });
    }
    if args.no_redis || !on_path("redis-server") {
        return Ok(Storage::Memory);
    }
    let port = free_port()?;
    let mut command = Command::new("redis-server");
    command.args([
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]);
    spawn(roles, logs, "redis".to_owned(), command)?;
    let deadline = Instant::now() + STARTUP_DEADLINE;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if Instant::now() > deadline {
            return Err(DemoError::NotReady {
                role: "redis".into(),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Storage::Owned {
        url: format!("redis://127.0.0.1:{port}"),
    })
}

/// The shipped region file with the demo's instances and Redis.
fn region_config(
    region: &str,
    text: &str,
    users: &[u16],
    bookings: &[u16],
    redis: Option<&str>,
) -> Result<String, DemoError> {
    let error = |reason: String| DemoError::Config {
        region: region.to_owned(),
        reason,
    };
    let mut table: toml::Table = toml::from_str(text).map_err(|e| error(e.to_string()))?;
    let urls = |ports: &[u16]| {
        toml::Value::Array(
            ports
                .iter()
                .map(|port| toml::Value::from(format!("http://127.0.0.1:{port}")))
                .collect(),
        )
    };
    let services = table
        .get_mut("services")
        .and_then(toml::Value::as_table_mut)
        .ok_or_else(|| error("no [services] table".into()))?;
    for (name, ports) in [("users", users), ("bookings", bookings)] {
        let service = services
            .get_mut(name)
            .and_then(toml::Value::as_table_mut)
            .ok_or_else(|| error(format!("no [services.{name}] table")))?;
        service.insert("instances".into(), urls(ports));
    }
    match redis {
        Some(url) => table.insert("redis_url".into(), url.into()),
        None => table.remove("redis_url"),
    };
    toml::to_string(&table).map_err(|e| error(e.to_string()))
}

/// `redis://host:port` with database `db`, keeping the regions' keys apart in one Redis.
fn with_db(url: &str, db: u32) -> String {
    let base = match url.rsplit_once('/') {
        Some((head, tail)) if !head.ends_with('/') && tail.parse::<u32>().is_ok() => head,
        _ => url.trim_end_matches('/'),
    };
    format!("{base}/{db}")
}

fn role_command(exe: &Path, service: &str) -> Command {
    let mut command = Command::new(exe);
    command.env("OTEL_SERVICE_NAME", service);
    command
}

fn spawn(
    roles: &mut Vec<Role>,
    logs: &mut JoinSet<()>,
    name: String,
    mut command: Command,
) -> Result<(), DemoError> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().map_err(|source| DemoError::Spawn {
        role: name.clone(),
        source,
    })?;
    if let Some(stdout) = child.stdout.take() {
        logs.spawn(prefix_lines(name.clone(), stdout));
    }
    if let Some(stderr) = child.stderr.take() {
        logs.spawn(prefix_lines(name.clone(), stderr));
    }
    roles.push(Role { name, child });
    Ok(())
}

/// Copies a child's output to ours, each line tagged with its role.
async fn prefix_lines(role: String, stream: impl tokio::io::AsyncRead + Unpin) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        eprintln!("[{role:>10}] {line}");
    }
}

async fn wait_ready(
    roles: &mut [Role],
    role: &str,
    admin_port: u16,
    deadline: Instant,
) -> Result<(), DemoError> {
    wait_for(roles, role, admin_port, "/ready", deadline, |_| true).await?;
    // The strict demo policy serves once every gateway has handed over (a cold start waits
    // one window plus one sub-window): wait for it, so the banner's booking works at once.
    wait_for(
        roles,
        role,
        admin_port,
        "/limits/bookings-global?key=ip:127.0.0.1",
        deadline,
        |body| {
            serde_json::from_slice::<serde_json::Value>(body).is_ok_and(|v| {
                v["tiers"][0]["strict"]["share_reclaimed"] == serde_json::Value::Bool(true)
            })
        },
    )
    .await
}

/// Polls `path` on the admin port until it answers 2xx with a body `accept` likes.
async fn wait_for(
    roles: &mut [Role],
    role: &str,
    admin_port: u16,
    path: &str,
    deadline: Instant,
    accept: impl Fn(&[u8]) -> bool,
) -> Result<(), DemoError> {
    use http_body_util::BodyExt;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let uri: http::Uri = format!("http://127.0.0.1:{admin_port}{path}")
        .parse()
        .map_err(|_| DemoError::NotReady { role: role.into() })?;
    loop {
        let answer = tokio::time::timeout(Duration::from_secs(1), async {
            let response = client.get(uri.clone()).await.ok()?;
            if !response.status().is_success() {
                return None;
            }
            response
                .into_body()
                .collect()
                .await
                .ok()
                .map(|b| b.to_bytes())
        })
        .await;
        if let Ok(Some(body)) = answer
            && accept(&body)
        {
            return Ok(());
        }
        for child in roles.iter_mut() {
            if let Ok(Some(status)) = child.child.try_wait() {
                return Err(DemoError::ChildExited {
                    role: child.name.clone(),
                    status: status.to_string(),
                });
            }
        }
        if Instant::now() > deadline {
            return Err(DemoError::NotReady { role: role.into() });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Resolves when any child exits, naming it.
async fn first_exit(roles: &mut [Role]) -> (String, String) {
    let waits = roles.iter_mut().map(|role| {
        Box::pin(async move {
            let status = role.child.wait().await;
            (
                role.name.clone(),
                status.map_or_else(|e| e.to_string(), |s| s.to_string()),
            )
        })
    });
    futures_util::future::select_all(waits).await.0
}

/// SIGTERM to the gateways first (so in-flight requests drain while the services still
/// answer), then the services, then Redis; SIGKILL whatever outlives the grace period.
async fn stop_all(roles: &mut [Role]) {
    roles.reverse();
    for role in roles.iter_mut() {
        if let Some(pid) = role.child.id()
            && let Ok(pid) = i32::try_from(pid)
        {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        match tokio::time::timeout(STOP_GRACE, role.child.wait()).await {
            Ok(_) => {}
            Err(_) => {
                tracing::warn!(role = %role.name, "did not stop within {STOP_GRACE:?}, killing");
                let _ = role.child.kill().await;
            }
        }
    }
    tracing::info!("demo stopped, every child process has exited");
}

fn ensure_free(port: u16) -> Result<(), DemoError> {
    StdTcpListener::bind((Ipv4Addr::LOCALHOST, port))
        .map(drop)
        .map_err(|_| DemoError::PortInUse { port })
}

fn free_port() -> Result<u16, DemoError> {
    StdTcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|_| DemoError::PortInUse { port: 0 })
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

fn print_banner(storage: &Storage, users: &[u16], bookings: &[u16], dir: &Path) {
    let storage_line = match storage {
        Storage::Owned { url } => format!("Redis {url} (started by the demo)"),
        Storage::External { url } => format!("Redis {url}"),
        Storage::Memory => {
            "embedded in-memory store (install redis-server for shared storage)".to_owned()
        }
    };
    let list = |ports: &[u16]| {
        ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut rows: BTreeMap<usize, String> = BTreeMap::new();
    for (i, (region, _, port, admin)) in REGIONS.iter().enumerate() {
        rows.insert(
            i,
            format!(
                "  gateway {region:<9} http://127.0.0.1:{port}   admin http://127.0.0.1:{admin}"
            ),
        );
    }
    println!("\ntollgate demo is running (Ctrl-C stops everything)\n");
    for row in rows.values() {
        println!("{row}");
    }
    println!("  users     {}", list(users));
    println!("  bookings  {}", list(bookings));
    println!("  storage   {storage_line}");
    println!("  configs   {}", dir.display());
    println!("  metrics   http://127.0.0.1:9081/metrics (each gateway's admin port)");
    println!(
        "  gossip    QUIC + mutual TLS on 127.0.0.1:7401-7403 (certificates in configs/certs)"
    );
    println!(
        "  global    bookings-global: strict, 10 POST /api/v1/bookings per 10 s per client, all regions together\n            \
         (the demo waits the 11 s a cold start needs: see the README's \"Global limits\")\n            \
         reads-global: eventual, about 600 GET /api/v1/... a minute per client, all regions together"
    );
    // The children inherit the OTEL_* variables; each sets its own OTEL_SERVICE_NAME.
    let endpoint = [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .iter()
    .find_map(|name| std::env::var(name).ok().filter(|v| !v.trim().is_empty()));
    match endpoint {
        Some(endpoint) => println!(
            "  traces    OTLP to {endpoint} as gateway, users, bookings \
             (find one by tag correlation_id=<X-Request-ID>)\n"
        ),
        None => println!("  traces    off (set OTEL_EXPORTER_OTLP_ENDPOINT to export)\n"),
    }
    println!("Try:");
    println!(
        "  curl -si -X POST http://127.0.0.1:8081/api/v1/users -H 'content-type: application/json' \\\n    -d '{{\"username\":\"ada\",\"password\":\"correct-horse\",\"name\":\"Ada\",\"lastName\":\"Lovelace\"}}'"
    );
    println!("  curl -s http://127.0.0.1:8082/api/v1/users/ada");
    println!(
        "  curl -si -X POST http://127.0.0.1:8083/api/v1/bookings -H 'content-type: application/json' \\\n    -d '{{\"user\":\"ada\",\"flightNumber\":\"AR1132\",\"origin\":\"EZE\",\"destination\":\"MAD\",\"departureTime\":\"2031-05-01T10:00:00Z\",\"passengers\":[{{\"fullName\":\"Ada Lovelace\",\"birthDate\":\"1815-12-10\",\"passportNumber\":\"X1234567\"}}]}}'"
    );
    println!("  curl -s 'http://127.0.0.1:8081/api/v1/bookings?user=ada'");
    println!("  curl -s http://127.0.0.1:9081/ready");
    println!("  curl -s 'http://127.0.0.1:9082/limits/reads-global?key=ip:127.0.0.1'\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_db_replaces_or_adds_the_database() {
        assert_eq!(
            with_db("redis://127.0.0.1:6379", 2),
            "redis://127.0.0.1:6379/2"
        );
        assert_eq!(
            with_db("redis://127.0.0.1:6379/", 2),
            "redis://127.0.0.1:6379/2"
        );
        assert_eq!(
            with_db("redis://127.0.0.1:6379/5", 1),
            "redis://127.0.0.1:6379/1"
        );
    }

    #[test]
    fn demo_configs_are_valid_region_configs() {
        for (region, text, _, _) in REGIONS {
            for redis in [None, Some("redis://127.0.0.1:1/3")] {
                let rendered = region_config(region, text, &[7001], &[7101], redis).unwrap();
                let config =
                    crate::config::RegionConfig::parse(Path::new("demo.toml"), &rendered, |_| None)
                        .unwrap();
                assert_eq!(config.services["users"].instances.len(), 1);
                assert_eq!(config.redis_url.as_deref(), redis);
            }
        }
    }
}
