//! The `tollgate` binary's command line, run as a child process.

use std::process::Command;

fn tollgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
}

#[test]
fn every_subcommand_has_help() {
    for sub in ["gateway", "users", "bookings", "demo"] {
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

#[test]
fn shipped_configs_pass_check() {
    for region in ["us-east", "eu-west", "ap-south"] {
        let output = tollgate()
            .args(["gateway", "--check", "--config"])
            .arg(format!(
                "{}/regions/{region}.toml",
                env!("CARGO_MANIFEST_DIR")
            ))
            .env_remove("TOLLGATE_LISTEN")
            .env_remove("TOLLGATE_ADMIN_LISTEN")
            .env_remove("TOLLGATE_REDIS_URL")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{region}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
