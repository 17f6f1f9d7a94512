//! Our books for one key: consumption by sub-window and, once rights moved, the columns.

use super::Col;

/// Our side of one key: our consumption and, once rights moved for it, the columns.
#[derive(Debug, Clone, Default)]
pub(super) struct KeyRights {
    /// `(sub-window, rights consumed)` by our own clock, sorted.
    pub(super) consumed: Vec<(u64, u64)>,
    /// Allocated on the first exchange: most keys never move rights, and two columns per
    /// slot would otherwise be most of a key's memory (measured with three slots and a
    /// million keys: 379 bytes per key with them, 167 without).
    pub(super) cols: Option<Box<Columns>>,
}

/// The columns of one key, one per slot.
#[derive(Debug, Clone)]
pub(super) struct Columns {
    // Both columns of a pair always share its epoch (set together when the pair is
    // emptied or moved to a new epoch).
    /// `given[j]`: our column for slot `j` (we write it).
    pub(super) given: Box<[Col]>,
    /// `recv[j]`: slot `j`'s column for us, as accepted.
    pub(super) recv: Box<[Col]>,
}

impl Columns {
    /// Empties the pair with slot `j` and moves it to `epoch`.
    pub(super) fn reset(&mut self, j: usize, epoch: u64) {
        if let (Some(g), Some(r)) = (self.given.get_mut(j), self.recv.get_mut(j)) {
            *g = Col::empty(epoch);
            *r = Col::empty(epoch);
        }
    }
}

impl KeyRights {
    /// Our column for slot `j` (zero if none).
    pub(super) fn given(&self, j: usize) -> Col {
        self.given_all().get(j).copied().unwrap_or_default()
    }

    /// Slot `j`'s column for us (zero if none).
    pub(super) fn recv(&self, j: usize) -> Col {
        self.recv_all().get(j).copied().unwrap_or_default()
    }

    pub(super) fn given_all(&self) -> &[Col] {
        self.cols.as_deref().map_or(&[], |c| &c.given)
    }

    pub(super) fn recv_all(&self) -> &[Col] {
        self.cols.as_deref().map_or(&[], |c| &c.recv)
    }

    /// The columns, one per slot of `floors` (the table's epoch floors, whose length is the
    /// slot count), allocated if need be with every pair empty at its floor. Callers index
    /// them with a slot index they checked against the slot list.
    pub(super) fn cols_mut(&mut self, floors: &[u64]) -> &mut Columns {
        self.cols.get_or_insert_with(|| {
            let empty: Box<[Col]> = floors.iter().map(|&f| Col::empty(f)).collect();
            Box::new(Columns {
                given: empty.clone(),
                recv: empty,
            })
        })
    }

    /// The pair's epoch with slot `j`: its columns' if allocated, else the table's floor.
    pub(super) fn epoch(&self, j: usize, floor: u64) -> u64 {
        self.cols
            .as_deref()
            .and_then(|c| c.given.get(j))
            .map_or(floor, |c| c.epoch)
    }

    /// Whether anything moved with slot `j` in the pair's current epoch.
    pub(super) fn is_open(&self, j: usize) -> bool {
        !self.given(j).is_zero() || !self.recv(j).is_zero()
    }

    pub(super) fn live(&self, oldest: u64) -> u64 {
        self.consumed
            .iter()
            .filter(|(s, _)| *s >= oldest)
            .map(|(_, c)| *c)
            .fold(0, u64::saturating_add)
    }

    pub(super) fn is_trivial(&self) -> bool {
        self.consumed.is_empty()
            && self.given_all().iter().all(Col::is_zero)
            && self.recv_all().iter().all(Col::is_zero)
    }
}
