//! The `tollgate` binary: every role of the system in one executable, so a deployment (or the
//! demo) ships and versions one artifact.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tollgate::config::RegionConfig;
use tollgate::services::{BookingsArgs, UsersArgs};
use tollgate::telemetry::{self, LogFormat, Role};

/// mimalloc instead of glibc's malloc: a proxied request makes about two dozen short-lived
/// allocations (headers, boxed futures, buffers); glibc spends ~250 instructions and an arena
/// lock per pair there, mimalloc a fraction (callgrind on `loadtest/proxy.toml`: see README,
/// Performance).
#[global_allocator]
static ALLOCATOR: Mimalloc = Mimalloc;

/// mimalloc through its malloc-style entry points wherever they give the alignment asked for.
///
/// `mimalloc::MiMalloc` sends every allocation to `mi_malloc_aligned`, whose fast path only
/// serves blocks up to 1 KiB that happen to be aligned; anything larger whose size class is
/// not a power of two (hyper's 8 KiB-and-up read buffers, header tables) falls to an
/// over-allocating path that pads each block by its alignment and costs ~180 instructions,
/// about nine times per proxied request. The rule std's own `System` allocator uses on
/// glibc is exact for mimalloc too: `mi_malloc` aligns every block of 16 bytes or more to 16
/// (`MI_MAX_ALIGN_SIZE`: size classes from 16 bytes up are multiples of 16 and pages start
/// 16-aligned) and smaller blocks to their size class, so a layout whose alignment is at most
/// 16 and at most its size is served aligned by `mi_malloc`. Anything else, and every free,
/// goes where `MiMalloc` sends it.
struct Mimalloc;

/// `MI_MAX_ALIGN_SIZE` in mimalloc's `types.h`.
const MALLOC_ALIGNMENT: usize = 16;

fn malloc_aligns(align: usize, size: usize) -> bool {
    align <= MALLOC_ALIGNMENT && align <= size
}

// SAFETY: each method forwards to the mimalloc function with the same contract (a block of
// at least `size` bytes with `layout.align()`, or null); `malloc_aligns` selects the
// unaligned entry points only where mimalloc's own alignment covers the layout (above).
// Blocks from either family are freed and reallocated by the same mimalloc heap.
unsafe impl std::alloc::GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if malloc_aligns(layout.align(), layout.size()) {
            // SAFETY: see the impl.
            unsafe { libmimalloc_sys::mi_malloc(layout.size()).cast() }
        } else {
            // SAFETY: see the impl.
            unsafe { mimalloc::MiMalloc.alloc(layout) }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        if malloc_aligns(layout.align(), layout.size()) {
            // SAFETY: see the impl.
            unsafe { libmimalloc_sys::mi_zalloc(layout.size()).cast() }
        } else {
            // SAFETY: see the impl.
            unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: `ptr` came from this allocator, so from mimalloc (see the impl).
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        if malloc_aligns(layout.align(), new_size) {
            // SAFETY: see the impl; `mi_realloc` keeps the contents and frees the old block.
            unsafe { libmimalloc_sys::mi_realloc(ptr.cast(), new_size).cast() }
        } else {
            // SAFETY: see the impl.
            unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
        }
    }
}

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
    /// Create the deployment CA and one gossip certificate per region.
    Certs(tollgate::certs::CertsArgs),
    /// GET a URL and exit 0 on a 2xx answer (container health checks).
    Probe(tollgate::probe::ProbeArgs),
}

#[derive(Debug, clap::Args)]
struct GatewayArgs {
    /// Region config file (TOML), e.g. regions/us-east.toml.
    #[arg(long, env = "TOLLGATE_CONFIG")]
    config: PathBuf,
    /// Validate the config and load the gossip certificate files, print the result and exit
    /// without serving.
    #[arg(long)]
    check: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Installed first, so a signal during startup still shuts down in order (and SIGHUP,
    // a reload, never ends the process: roles without a config to reload ignore it).
    let shutdown = tollgate::shutdown::signal();
    let hangups = tollgate::shutdown::hangups();
    // Each role returns its result instead of `?`-ing out, so that the pending spans are
    // flushed (telemetry.shutdown) whether it succeeded or not.
    match cli.command {
        Command::Certs(args) => {
            // Offline and one-shot: no telemetry. Errors are the operator's to fix (a bad
            // name, an existing CA, an unwritable directory): print them without anyhow's
            // backtrace.
            if let Err(error) = tollgate::certs::run(&args) {
                eprintln!("tollgate certs: {error}");
                std::process::exit(if error.is_usage() { 2 } else { 1 });
            }
            Ok(())
        }
        Command::Probe(args) => match tollgate::probe::run(&args).await {
            Ok(_) => Ok(()),
            Err(error) => {
                eprintln!("tollgate probe: {error}");
                std::process::exit(1);
            }
        },
        Command::Gateway(args) => {
            // The config comes first: the gateway's traces carry its region.
            let (config, digest) = match RegionConfig::load_digested(&args.config) {
                Ok(loaded) => loaded,
                Err(error) => {
                    // A config mistake is the operator's to fix, not a crash: print every
                    // problem, without anyhow's backtrace, and exit with a usage-error code.
                    eprintln!("{error}");
                    std::process::exit(2);
                }
            };
            if args.check {
                let gateway = match tollgate::global::check_certificates(&config) {
                    Ok(gateway) => gateway,
                    Err(error) => {
                        eprintln!("{}: {error}", args.config.display());
                        std::process::exit(2);
                    }
                };
                let certificates = gateway
                    .map(|g| format!(", gossip certificates of {g}"))
                    .unwrap_or_default();
                println!(
                    "{}: valid (region {}, {} services{certificates})",
                    args.config.display(),
                    config.region,
                    config.services.len()
                );
                return Ok(());
            }
            let region = config.region.clone();
            let telemetry = telemetry::init(cli.log_format, Role::Gateway { region: &region })?;
            tollgate::metrics::install();
            tollgate::telemetry::set_log_level(config.log_level.as_deref());
            let source = tollgate::gateway::ConfigSource {
                path: args.config.clone(),
                digest,
            };
            let result = tollgate::gateway::run(config, source, shutdown, hangups)
                .await
                .context("gateway failed");
            telemetry.shutdown().await;
            result
        }
        Command::Users(args) => {
            let telemetry = telemetry::init(cli.log_format, Role::Users)?;
            let result = tollgate::services::users::run(args, shutdown)
                .await
                .context("users service failed");
            telemetry.shutdown().await;
            result
        }
        Command::Bookings(args) => {
            let telemetry = telemetry::init(cli.log_format, Role::Bookings)?;
            let result = tollgate::services::bookings::run(args, shutdown)
                .await
                .context("bookings service failed");
            telemetry.shutdown().await;
            result
        }
        Command::Demo(args) => {
            // The demo serves nothing itself; its children export under their own names.
            let telemetry = telemetry::init(cli.log_format, Role::Demo)?;
            let result = tollgate::demo::run(args, shutdown, hangups)
                .await
                .context("demo failed");
            telemetry.shutdown().await;
            result
        }
    }
}

#[cfg(test)]
mod tests {
    use std::alloc::{GlobalAlloc, Layout};

    use super::Mimalloc;

    /// Layouts on both sides of the malloc-style rule, awkward sizes included (a 24-byte,
    /// 16-aligned block is the size class that would be only 8-aligned if mimalloc had one),
    /// allocated, written, grown across the 1 KiB line and back, and freed.
    #[test]
    fn every_block_has_the_alignment_its_layout_asks_for() {
        let layouts = [
            (1, 1),
            (8, 8),
            (24, 16),
            (48, 16),
            (52, 4),
            (17_000, 16),
            (64, 64),
        ];
        for (size, align) in layouts {
            let Ok(layout) = Layout::from_size_align(size, align) else {
                panic!("bad layout {size}/{align}");
            };
            // SAFETY: non-zero sizes; each block is written within its size, reallocated with
            // the layout it was made with, and freed once.
            unsafe {
                for zeroed in [false, true] {
                    let block = if zeroed {
                        Mimalloc.alloc_zeroed(layout)
                    } else {
                        Mimalloc.alloc(layout)
                    };
                    assert!(!block.is_null());
                    assert_eq!(block as usize % align, 0, "{size}/{align}");
                    if zeroed {
                        assert!(
                            std::slice::from_raw_parts(block, size)
                                .iter()
                                .all(|b| *b == 0)
                        );
                    }
                    block.write_bytes(0xA5, size);
                    let grown = Mimalloc.realloc(block, layout, size * 3 + 2_000);
                    assert!(!grown.is_null());
                    assert_eq!(grown as usize % align, 0, "{size}/{align} grown");
                    assert!(
                        std::slice::from_raw_parts(grown, size)
                            .iter()
                            .all(|b| *b == 0xA5)
                    );
                    let grown_layout = Layout::from_size_align_unchecked(size * 3 + 2_000, align);
                    let shrunk = Mimalloc.realloc(grown, grown_layout, size);
                    assert_eq!(shrunk as usize % align, 0, "{size}/{align} shrunk");
                    assert!(
                        std::slice::from_raw_parts(shrunk, size)
                            .iter()
                            .all(|b| *b == 0xA5)
                    );
                    Mimalloc.dealloc(shrunk, layout);
                }
            }
        }
    }
}
