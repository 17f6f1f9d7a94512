//! The `tollgate` binary: every role of the system in one executable, so a deployment (or the
//! demo) ships and versions one artifact.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tollgate::config::RegionConfig;
use tollgate::services::{BookingsArgs, UsersArgs};
use tollgate::telemetry::{self, LogFormat};

#[derive(Debug, Parser)]
#[command(
    name = "tollgate",
    version,
    about = "A multi-region API gateway with rate limiting"
)]
struct Cli {
    /// Log line format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "human",
        env = "TOLLGATE_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a regional gateway.
    Gateway(GatewayArgs),
    /// Run the users service (the airline's employees).
    Users(UsersArgs),
    /// Run the bookings service (flights booked by users for passengers).
    Bookings(BookingsArgs),
    /// Run three regional gateways and the services on this machine.
    Demo(tollgate::demo::DemoArgs),
}

#[derive(Debug, clap::Args)]
struct GatewayArgs {
    /// Region config file (TOML), e.g. regions/us-east.toml.
    #[arg(long, env = "TOLLGATE_CONFIG")]
    config: PathBuf,
    /// Validate the config, print the result and exit without serving.
    #[arg(long)]
    check: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Installed first, so a signal during startup still shuts down in order.
    let shutdown = tollgate::shutdown::signal();
    match cli.command {
        Command::Gateway(args) => {
            telemetry::init(cli.log_format, "gateway");
            let config = RegionConfig::load(&args.config)?;
            if args.check {
                println!(
                    "{}: valid (region {}, {} services)",
                    args.config.display(),
                    config.region,
                    config.services.len()
                );
                return Ok(());
            }
            tollgate::gateway::run(config, shutdown)
                .await
                .context("gateway failed")?;
        }
        Command::Users(args) => {
            telemetry::init(cli.log_format, "users");
            tollgate::services::users::run(args, shutdown)
                .await
                .context("users service failed")?;
        }
        Command::Bookings(args) => {
            telemetry::init(cli.log_format, "bookings");
            tollgate::services::bookings::run(args, shutdown)
                .await
                .context("bookings service failed")?;
        }
        Command::Demo(args) => {
            telemetry::init(cli.log_format, "demo");
            tollgate::demo::run(args, shutdown)
                .await
                .context("demo failed")?;
        }
    }
    Ok(())
}
