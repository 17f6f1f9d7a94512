//! The proxy listener served by one thread per core, each with its own single-threaded Tokio
//! runtime, as nginx runs one worker process per core.
//!
//! # Why not the multi-threaded runtime
//!
//! On the shared runtime a proxied request is two tasks, the client connection and the
//! upstream connection (hyper drives each as its own task), that work stealing spreads over
//! the threads: every exchange between them can be a cross-thread wake-up (a futex call, a
//! context switch, cold caches), and idle threads are woken to look for work. Measured with
//! `loadtest/run.sh` on 2 cores, the default two worker threads needed 0.43 CPU s per 10,000
//! requests where one thread needed 0.28 (26,700 against 34,000 req/s). Here a connection
//! accepted by a worker stays on it, and so do the upstream connections it opens (each worker
//! has its own idle connections, see [`client::set_home`]), so a request never leaves its
//! thread.
//!
//! Everything else (the admin API, gossip, the Redis batcher, health checks) stays on the
//! process's multi-threaded runtime; requests reach those through channels, as before.

use std::future::Future;
use std::io;
use std::num::NonZeroUsize;

use futures_util::future::select_all;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

use super::stack::{Next, ProxyStack, serve};
use crate::proxy::client;

/// How many workers `configured` means: itself, or one per core the process may use.
pub fn count(configured: Option<usize>) -> NonZeroUsize {
    configured
        .and_then(NonZeroUsize::new)
        .or_else(|| std::thread::available_parallelism().ok())
        .unwrap_or(NonZeroUsize::MIN)
}

/// Serves `stack` on `listener` from `workers` threads, each accepting from the same socket
/// (whichever is free takes the next connection), until `shutdown` resolves; then every worker
/// stops accepting and lets its connections finish their in-flight request, and this returns
/// once all have. Dropping the future stops the workers the same way, without waiting.
pub async fn serve_on_workers(
    listener: TcpListener,
    stack: ProxyStack,
    workers: NonZeroUsize,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let listener = listener.into_std()?;
    let (stop, stopped) = watch::channel(false);
    let mut finished = Vec::with_capacity(workers.get());
    for index in 1..=workers.get() {
        let listener = listener.try_clone()?;
        let stack = stack.for_worker();
        let mut stopped = stopped.clone();
        let (done, done_rx) = oneshot::channel::<io::Result<()>>();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name(format!("tollgate-proxy-{index}"))
            .spawn(move || {
                client::set_home(index);
                let result = runtime.block_on(async move {
                    let listener = TcpListener::from_std(listener)?;
                    let shutdown = async move {
                        // The signal, or the sender gone (the caller stopped waiting): stop.
                        let _ = stopped.wait_for(|stop| *stop).await;
                    };
                    serve(listener, stack, shutdown).await
                });
                // Dropping the runtime here ends what its connections left running (idle
                // upstream connections).
                let _ = done.send(result);
            })?;
        finished.push(done_rx);
    }
    drop(listener);
    tokio::select! {
        () = shutdown => {}
        // A worker only ends early if it could not start serving.
        (result, _, _) = select_all(&mut finished) => {
            let _ = stop.send(true);
            return worker_result(result);
        }
    }
    let _ = stop.send(true);
    for done in finished {
        worker_result(done.await)?;
    }
    Ok(())
}

fn worker_result(result: Result<io::Result<()>, oneshot::error::RecvError>) -> io::Result<()> {
    result.unwrap_or_else(|_| Err(io::Error::other("a proxy worker thread panicked")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configured_count_wins_and_auto_is_at_least_one() {
        assert_eq!(count(Some(3)).get(), 3);
        assert!(count(None).get() >= 1);
    }
}
