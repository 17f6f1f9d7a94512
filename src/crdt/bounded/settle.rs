//! Returning to baseline: settling idle pairs, forgetting empty keys, evicting at the cap
//! (see "Returning to baseline" in the module docs).

use std::ops::Bound::{Excluded, Included, Unbounded};

use super::{BoundedTable, Outgoing, PolicyId};

/// Keys an eviction looks at before giving up (the scan resumes where it stopped).
const EVICTION_SCAN: usize = 64;

/// What a settle pass does with one pair of an idle key, from our view of it.
enum PairStep {
    /// We received more than we gave: give the difference back (as far as we hold it).
    GiveBack(u64),
    /// Equal columns: settle (empty our side, next epoch, tell the peer).
    Settle,
    /// We gave more: resend our column, which repairs a lost or refused transfer.
    Resend,
}

impl BoundedTable {
    /// One settle pass over at most `max_keys` keys from where the last one stopped: on
    /// every key without live consumption, for every pair with something in its current
    /// epoch, the net receiver gives the difference back, a pair whose columns are equal is
    /// settled, and a net giver resends its column. Queues the messages (see
    /// [`BoundedTable::take_outgoing`]); returns how many keys it looked at.
    ///
    /// Only a reclaimed incarnation settles (before that it does not know its books), and
    /// only with a peer incarnation known to have reclaimed (see the module docs for why).
    pub fn settle(&mut self, now_us: u64, max_keys: usize) -> usize {
        self.tick(now_us);
        if !self.reclaimed || self.superseded || self.retired {
            return 0;
        }
        let now = self.clock_us;
        let me = usize::from(self.me);
        let n = self.slots.len();
        let batch = self.keys_from_cursor(max_keys);
        let seen = batch.len();
        for (policy, key) in batch {
            if self.outbox.len() >= super::MAX_OUTGOING {
                // Resume here next time rather than drop what is due.
                self.cursor = Some((policy, key));
                break;
            }
            let Some(p) = self.policies.get(&policy).copied() else {
                continue;
            };
            let Some(kr) = self.rights(policy, &key) else {
                continue;
            };
            if kr.live(p.spec.oldest_live(now)) > 0 {
                continue;
            }
            let mut steps = Vec::new();
            for j in (0..n).filter(|&j| j != me && kr.is_open(j)) {
                let (given, recv) = (kr.given(j).total, kr.recv(j).total);
                let step = match recv.cmp(&given) {
                    std::cmp::Ordering::Greater => PairStep::GiveBack(recv - given),
                    std::cmp::Ordering::Equal => PairStep::Settle,
                    std::cmp::Ordering::Less => PairStep::Resend,
                };
                steps.push((j, step));
            }
            for (j, step) in steps {
                let Ok(to) = u16::try_from(j) else { continue };
                match step {
                    PairStep::GiveBack(owed) => {
                        let amount = owed.min(self.available(policy, &key, now));
                        let to_inc = self.incs[j];
                        if amount > 0
                            && to_inc != 0
                            && let Some(t) = self.give(policy, &key, to, to_inc, amount)
                        {
                            self.push_out(Outgoing::Transfer(t));
                        }
                    }
                    PairStep::Settle => {
                        if self.incs[j] == 0 || self.peer_reclaimed[j] != self.incs[j] {
                            continue;
                        }
                        let floor = self.floor[j];
                        let epoch = self
                            .rights(policy, &key)
                            .map_or(floor, |kr| kr.epoch(j, floor));
                        // An epoch that cannot advance stays open (only a peer forging
                        // epochs gets there).
                        let Some(next) = epoch.checked_add(1) else {
                            continue;
                        };
                        self.reset_pair(policy, &key, j, next);
                        self.certify(policy, &key, j, next);
                    }
                    PairStep::Resend => {
                        if let Some(t) = self.transfer_to(policy, &key, to) {
                            self.push_out(Outgoing::Transfer(t));
                        }
                    }
                }
            }
        }
        seen
    }

    /// Up to `max` keys after the cursor (wrapping round to the first), advancing it.
    /// Costs `O(max + log keys)`: a pass never walks the whole table.
    fn keys_from_cursor(&mut self, max: usize) -> Vec<(PolicyId, Box<str>)> {
        let mut out: Vec<(PolicyId, Box<str>)> = Vec::new();
        if max == 0 || self.key_count == 0 {
            return out;
        }
        let start = self.cursor.take();
        let mut take = |policy: PolicyId, keys: &mut dyn Iterator<Item = &Box<str>>| {
            for key in keys {
                if out.len() >= max {
                    return;
                }
                out.push((policy, key.clone()));
            }
        };
        match &start {
            Some((sp, sk)) => {
                if let Some(keys) = self.keys.get(sp) {
                    let mut after = keys
                        .range::<str, _>((Excluded(&**sk), Unbounded))
                        .map(|(k, _)| k);
                    take(*sp, &mut after);
                }
                for (&policy, keys) in self.keys.range((Excluded(*sp), Unbounded)) {
                    take(policy, &mut keys.keys());
                }
                // Wrap round, up to and including the cursor.
                for (&policy, keys) in self.keys.range(..=*sp) {
                    let mut upto = keys
                        .range::<str, _>((Unbounded, Included(&**sk)))
                        .map(|(k, _)| k);
                    if policy == *sp {
                        take(policy, &mut upto);
                    } else {
                        take(policy, &mut keys.keys());
                    }
                }
            }
            None => {
                for (&policy, keys) in &self.keys {
                    take(policy, &mut keys.keys());
                }
            }
        }
        self.cursor = out.last().cloned();
        out
    }

    /// Drops expired consumption and forgets keys with nothing left: no live consumption
    /// and every pair empty. A forgotten key's pair epochs are folded into the floors, so
    /// its settled epochs stay refused.
    pub fn gc(&mut self, now_us: u64) {
        self.tick(now_us);
        let now = self.clock_us;
        let mut dropped = 0;
        let floor = &mut self.floor;
        for (policy, keys) in &mut self.keys {
            let Some(p) = self.policies.get(policy) else {
                continue;
            };
            let oldest = p.spec.oldest_live(now);
            keys.retain(|_, kr| {
                kr.consumed.retain(|(s, _)| *s >= oldest);
                let keep = !kr.is_trivial();
                if !keep {
                    dropped += 1;
                    for (j, f) in floor.iter_mut().enumerate() {
                        *f = (*f).max(kr.epoch(j, *f));
                    }
                }
                keep
            });
        }
        self.keys.retain(|_, k| !k.is_empty());
        self.key_count -= dropped;
    }

    /// At the key cap: forgets one key whose state can go without raising anyone's rights,
    /// looking at up to [`EVICTION_SCAN`] keys. Such a key has no live consumption, and in
    /// every open pair we received at least what we gave: dropping it lowers our rights by
    /// what we received net (we hold it: nothing is consumed), and the peers we tell (a
    /// [`super::Settled`] of the next epoch, our floor raised past it) then take back what
    /// they gave. A key where we gave more cannot go (that would raise us); neither can
    /// one with live consumption. Returns whether a key went.
    pub(super) fn evict_one(&mut self) -> bool {
        if !self.reclaimed || self.superseded {
            return false;
        }
        let now = self.clock_us;
        let me = usize::from(self.me);
        let n = self.slots.len();
        for (policy, key) in self.keys_from_cursor(EVICTION_SCAN) {
            let (Some(p), Some(kr)) = (self.policies.get(&policy), self.rights(policy, &key))
            else {
                continue;
            };
            if kr.live(p.spec.oldest_live(now)) > 0 {
                continue;
            }
            let open: Vec<usize> = (0..n).filter(|&j| j != me && kr.is_open(j)).collect();
            if open.iter().any(|&j| kr.recv(j).total < kr.given(j).total) {
                continue;
            }
            let epochs: Vec<u64> = (0..n).map(|j| kr.epoch(j, self.floor[j])).collect();
            if open.iter().any(|&j| epochs[j] == u64::MAX) {
                continue;
            }
            let mut certs = Vec::new();
            for (j, &e) in epochs.iter().enumerate() {
                let next = if open.contains(&j) {
                    certs.push((j, e + 1));
                    e + 1
                } else {
                    e
                };
                self.floor[j] = self.floor[j].max(next);
            }
            for &j in &open {
                self.open[j] = self.open[j].saturating_sub(1);
            }
            if let Some(keys) = self.keys.get_mut(&policy) {
                keys.remove(&key);
                if keys.is_empty() {
                    self.keys.remove(&policy);
                }
            }
            self.key_count -= 1;
            self.stats.evicted += 1;
            for (j, next) in certs {
                self.certify(policy, &key, j, next);
            }
            return true;
        }
        false
    }
}
