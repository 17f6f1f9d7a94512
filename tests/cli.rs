//! The `tollgate` binary's command line, run as a child process.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn tollgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
}

#[test]
fn every_subcommand_has_help() {
    for sub in ["gateway", "users", "bookings", "demo", "certs", "probe"] {
        let output = tollgate().args([sub, "--help"]).output().unwrap();
        assert!(output.status.success(), "{sub} --help failed");
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(text.contains("Usage: tollgate"), "{sub}: {text}");
    }
}

#[test]
fn invalid_config_lists_every_error_with_file_and_key() {
    let dir = std::env::temp_dir().join(format!("tollgate-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("broken.toml");
    std::fs::write(
        &path,
        r#"
region = "Bad Region"
listen = "nowhere"
admin_listen = "127.0.0.1:9081"
typo_key = 1

[services.users]
routes = ["/api/v1/users"]
instances = ["ftp://users:21"]
request_timeout = "eventually"
"#,
    )
    .unwrap();
    let output = tollgate()
        .args(["gateway", "--check", "--config"])
        .arg(&path)
        .env_remove("TOLLGATE_LISTEN")
        .env_remove("TOLLGATE_ADMIN_LISTEN")
        .env_remove("TOLLGATE_REDIS_URL")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    for key in [
        "region",
        "listen",
        "typo_key",
        "services.users.instances[0]",
        "services.users.request_timeout",
    ] {
        assert!(
            stderr.contains(&format!("broken.toml: {key}: ")),
            "{key} not reported:\n{stderr}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The shipped region files, copied into a fresh directory without `certs/` (a new clone).
fn shipped_regions() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for region in ["us-east", "eu-west", "ap-south"] {
        std::fs::copy(
            format!("{}/regions/{region}.toml", env!("CARGO_MANIFEST_DIR")),
            dir.path().join(format!("{region}.toml")),
        )
        .unwrap();
    }
    dir
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// `tollgate gateway ARGS --config DIR/REGION.toml` with none of the environment's overrides
/// (the listeners on free ports, where a test starts the gateway).
fn gateway(dir: &std::path::Path, region: &str, args: &[&str]) -> std::process::Output {
    tollgate()
        .env_clear()
        .env("RUST_BACKTRACE", "0")
        .env("TOLLGATE_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env(
            "TOLLGATE_ADMIN_LISTEN",
            format!("127.0.0.1:{}", free_port()),
        )
        .env("TOLLGATE_GOSSIP_LISTEN", "127.0.0.1:0")
        .arg("gateway")
        .args(args)
        .arg("--config")
        .arg(dir.join(format!("{region}.toml")))
        .output()
        .unwrap()
}

/// The command a start-up error names between backticks.
fn quoted_command(stderr: &str) -> Vec<String> {
    let command = stderr
        .split('`')
        .nth(1)
        .unwrap_or_else(|| panic!("no `command` in: {stderr}"));
    command.split_whitespace().map(str::to_owned).collect()
}

#[test]
fn shipped_configs_pass_check_with_the_certificates_the_error_names() {
    let dir = shipped_regions();
    let missing = gateway(dir.path(), "us-east", &["--check"]);
    assert_eq!(missing.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&missing.stderr).into_owned();
    let ca = dir.path().join("certs/ca.pem");
    assert_eq!(
        stderr.trim_end(),
        format!(
            "{config}: gossip CA certificate {ca} does not exist: `tollgate certs --out {certs} \
             --gateways us-east/a,eu-west/a,ap-south/a` makes it (with the CA and every \
             gateway's certificate and key)",
            config = dir.path().join("us-east.toml").display(),
            ca = ca.display(),
            certs = dir.path().join("certs").display(),
        )
    );

    // The command it names, run as given, makes every shipped file pass.
    let command = quoted_command(&stderr);
    assert_eq!(command[..2], ["tollgate", "certs"]);
    let made = tollgate().args(&command[1..]).output().unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    for region in ["us-east", "eu-west", "ap-south"] {
        let output = gateway(dir.path(), region, &["--check"]);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{region}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            stdout.contains(&format!("gossip certificates of {region}/a")),
            "{stdout}"
        );
    }
}

#[test]
fn a_missing_key_next_to_a_ca_names_the_command_that_replaces_it() {
    let dir = shipped_regions();
    let certs = dir.path().join("certs");
    let made = tollgate()
        .args(["certs", "--regions", "us-east,eu-west,ap-south", "--out"])
        .arg(&certs)
        .output()
        .unwrap();
    assert!(made.status.success());
    std::fs::remove_file(certs.join("eu-west.a.key")).unwrap();
    let output = gateway(dir.path(), "eu-west", &["--check"]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "gossip key {} does not exist: `tollgate certs --out {} --gateways \
             us-east/a,eu-west/a,ap-south/a --force` makes it, replacing the CA",
            certs.join("eu-west.a.key").display(),
            certs.display()
        )),
        "{stderr}"
    );
}

#[test]
fn a_gateway_without_its_certificates_says_why_once() {
    let dir = shipped_regions();
    let output = gateway(dir.path(), "us-east", &[]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.matches("does not exist").count(), 1, "{stderr}");
    assert_eq!(stderr.matches("No such file").count(), 0, "{stderr}");
    assert!(stderr.contains("`tollgate certs --out "), "{stderr}");
}

/// Answers one HTTP request with `status` on a free port; returns the port.
fn answer_once(status: &'static str) -> u16 {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut request = [0u8; 1024];
        let _ = stream.read(&mut request);
        let _ = write!(stream, "HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
    });
    port
}

#[test]
fn probe_exits_0_on_2xx_only() {
    let probe = |url: String| tollgate().args(["probe", &url]).output().unwrap();
    let ok = probe(format!("http://127.0.0.1:{}/health", answer_once("200 OK")));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let busy = probe(format!(
        "http://127.0.0.1:{}/ready",
        answer_once("503 Service Unavailable")
    ));
    assert_eq!(busy.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&busy.stderr).contains("503"));
    let closed = probe(format!("http://127.0.0.1:{}/", free_port()));
    assert_eq!(closed.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&closed.stderr).contains("refused"),
        "{}",
        String::from_utf8_lossy(&closed.stderr)
    );
}
