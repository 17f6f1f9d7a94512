//! Upstream instances, their health, and the choice of one per request.
//!
//! An instance is available when its last active health verdict is healthy and it is not
//! passively ejected. Passive ejection reacts within one request to an instance that refuses
//! connections; active checks bring it back (or, without active checks, the ejection simply
//! expires). Selection is power-of-two-choices on in-flight requests: nearly as good as
//! least-loaded, with no global scan or lock, and it does not stampede a freshly recovered
//! instance the way least-loaded does.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::client::Connections;
use crate::config::{HealthCheckConfig, Instance};

/// One upstream instance and what the gateway knows of it.
#[derive(Debug)]
pub struct Endpoint {
    pub instance: Instance,
    /// Its kept-alive connections.
    pub connections: std::sync::Arc<Connections>,
    /// Requests sent to it whose response has not finished yet.
    in_flight: AtomicUsize,
    health: Mutex<Health>,
}

#[derive(Debug)]
struct Health {
    /// Verdict of active checks; true until a check says otherwise, so traffic flows at once.
    active_healthy: bool,
    consecutive_successes: u32,
    consecutive_failures: u32,
    /// Set by a refused connection; the instance is skipped until then.
    ejected_until: Option<Instant>,
}

/// What an active check changed, so the caller logs transitions once, not every check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    None,
    BecameHealthy,
    BecameUnhealthy,
}

impl Endpoint {
    /// An instance reached within `connect_timeout`, keeping up to `max_idle` connections.
    pub fn new(instance: Instance, connect_timeout: Duration, max_idle: usize) -> Self {
        Self {
            connections: std::sync::Arc::new(Connections::new(
                &instance,
                connect_timeout,
                max_idle,
            )),
            instance,
            in_flight: AtomicUsize::new(0),
            health: Mutex::new(Health {
                active_healthy: true,
                consecutive_successes: 0,
                consecutive_failures: 0,
                ejected_until: None,
            }),
        }
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        // The lock is never held across code that can panic, so poisoning cannot leave the
        // state half-written; recover the guard rather than propagate a poison panic.
        self.health
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    pub fn is_available(&self, now: Instant) -> bool {
        let health = self.health();
        health.active_healthy && health.ejected_until.is_none_or(|until| until <= now)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a request as in flight until the guard is dropped (with the response body).
    pub fn start_request(self: &std::sync::Arc<Self>) -> InFlightGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlightGuard(self.clone())
    }

    /// Passive ejection after a refused or failed connection.
    pub fn eject(&self, now: Instant, duration: Duration) -> bool {
        let mut health = self.health();
        let was_available = health.ejected_until.is_none_or(|until| until <= now);
        health.ejected_until = Some(now + duration);
        // Recovery must be proven by checks made after the failure.
        health.consecutive_successes = 0;
        was_available
    }

    /// Records an active health check result.
    pub fn record_check(&self, healthy: bool, config: &HealthCheckConfig) -> Transition {
        let mut health = self.health();
        if healthy {
            health.consecutive_failures = 0;
            health.consecutive_successes = health.consecutive_successes.saturating_add(1);
            if health.consecutive_successes >= config.healthy_threshold {
                // A passing check proves the instance accepts connections again.
                let was_out = !health.active_healthy || health.ejected_until.is_some();
                health.active_healthy = true;
                health.ejected_until = None;
                if was_out {
                    return Transition::BecameHealthy;
                }
            }
        } else {
            health.consecutive_successes = 0;
            health.consecutive_failures = health.consecutive_failures.saturating_add(1);
            if health.consecutive_failures >= config.unhealthy_threshold && health.active_healthy {
                health.active_healthy = false;
                return Transition::BecameUnhealthy;
            }
        }
        Transition::None
    }
}

/// Decrements the endpoint's in-flight count when dropped.
#[derive(Debug)]
pub struct InFlightGuard(std::sync::Arc<Endpoint>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The instances of one service.
#[derive(Debug)]
pub struct Pool {
    pub endpoints: Vec<std::sync::Arc<Endpoint>>,
    /// Source of the two random candidates; a counter through splitmix64 is enough for
    /// spreading choices and needs no lock or RNG state per thread.
    sequence: AtomicU64,
}

impl Pool {
    pub fn new(instances: &[Instance], connect_timeout: Duration, max_idle: usize) -> Self {
        Self {
            endpoints: instances
                .iter()
                .cloned()
                .map(|i| std::sync::Arc::new(Endpoint::new(i, connect_timeout, max_idle)))
                .collect(),
            sequence: AtomicU64::new(0),
        }
    }

    /// Number of instances available now.
    pub fn available(&self, now: Instant) -> usize {
        self.endpoints
            .iter()
            .filter(|e| e.is_available(now))
            .count()
    }

    /// Picks an available instance not in `tried` (a bit set of indices): two random
    /// candidates, the one with fewer requests in flight wins.
    pub fn pick(&self, now: Instant, tried: u64) -> Option<usize> {
        let eligible =
            |i: usize| (i >= 64 || tried & (1 << i) == 0) && self.endpoints[i].is_available(now);
        // The common deployments have a handful of instances: their candidates fit on the
        // stack, so a pick allocates nothing.
        let mut on_stack = [0usize; 16];
        let mut spilled = Vec::new();
        let mut n = 0;
        for i in (0..self.endpoints.len()).filter(|&i| eligible(i)) {
            if n < on_stack.len() {
                on_stack[n] = i;
            } else {
                if spilled.is_empty() {
                    spilled.extend_from_slice(&on_stack);
                }
                spilled.push(i);
            }
            n += 1;
        }
        let candidates: &[usize] = if spilled.is_empty() {
            &on_stack[..n]
        } else {
            &spilled
        };
        match candidates.len() {
            0 => None,
            1 => Some(candidates[0]),
            n => {
                let r = splitmix64(self.sequence.fetch_add(1, Ordering::Relaxed));
                let a = (r % n as u64) as usize;
                // A second index distinct from the first.
                let b = (a + 1 + ((r >> 32) % (n as u64 - 1)) as usize) % n;
                let (a, b) = (candidates[a], candidates[b]);
                if self.endpoints[b].in_flight() < self.endpoints[a].in_flight() {
                    Some(b)
                } else {
                    Some(a)
                }
            }
        }
    }
}

fn splitmix64(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(n: usize) -> Pool {
        let instances: Vec<Instance> = (0..n)
            .map(|i| Instance::parse(&format!("http://127.0.0.1:{}", 7000 + i)).unwrap())
            .collect();
        Pool::new(&instances, Duration::from_secs(1), 4)
    }

    fn check() -> HealthCheckConfig {
        HealthCheckConfig {
            path: "/health".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            healthy_threshold: 2,
            unhealthy_threshold: 2,
        }
    }

    #[test]
    fn picks_spread_over_idle_instances() {
        let pool = pool(3);
        let now = Instant::now();
        let mut counts = [0; 3];
        for _ in 0..3000 {
            counts[pool.pick(now, 0).unwrap()] += 1;
        }
        assert!(counts.iter().all(|&c| c > 700), "{counts:?}");
    }

    #[test]
    fn prefers_the_less_loaded_of_two() {
        let pool = pool(2);
        let now = Instant::now();
        let _busy: Vec<_> = (0..5).map(|_| pool.endpoints[0].start_request()).collect();
        for _ in 0..100 {
            assert_eq!(pool.pick(now, 0), Some(1));
        }
    }

    #[test]
    fn ejected_instances_are_skipped_until_the_ejection_expires() {
        let pool = pool(2);
        let now = Instant::now();
        pool.endpoints[0].eject(now, Duration::from_secs(10));
        assert_eq!(pool.available(now), 1);
        assert!((0..50).all(|_| pool.pick(now, 0) == Some(1)));
        assert_eq!(pool.available(now + Duration::from_secs(10)), 2);
    }

    #[test]
    fn picks_among_more_instances_than_fit_on_the_stack() {
        let pool = pool(40);
        let now = Instant::now();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..4000 {
            seen.insert(pool.pick(now, 0).unwrap());
        }
        assert_eq!(seen.len(), 40);
        let all_but_last = (1u64 << 39) - 1;
        assert_eq!(pool.pick(now, all_but_last), Some(39));
    }

    #[test]
    fn tried_instances_are_excluded() {
        let pool = pool(2);
        let now = Instant::now();
        assert_eq!(pool.pick(now, 0b01), Some(1));
        assert_eq!(pool.pick(now, 0b11), None);
    }

    #[test]
    fn active_checks_use_thresholds_and_clear_ejection() {
        let pool = pool(1);
        let endpoint = &pool.endpoints[0];
        let now = Instant::now();
        let config = check();
        assert_eq!(endpoint.record_check(false, &config), Transition::None);
        assert_eq!(
            endpoint.record_check(false, &config),
            Transition::BecameUnhealthy
        );
        assert!(!endpoint.is_available(now));
        assert_eq!(endpoint.record_check(true, &config), Transition::None);
        assert_eq!(
            endpoint.record_check(true, &config),
            Transition::BecameHealthy
        );
        assert!(endpoint.is_available(now));
        endpoint.eject(now, Duration::from_secs(60));
        assert!(!endpoint.is_available(now));
        endpoint.record_check(true, &config);
        assert_eq!(
            endpoint.record_check(true, &config),
            Transition::BecameHealthy
        );
        assert!(endpoint.is_available(now));
    }
}
