//! Slab.
//!
//! ringway: a thin wrapper over the `slab` crate, keeping the interface monoio's drivers use.
//! monoio's own paged slab spent about 110 instructions per io_uring operation on finding a
//! page, a generation count and compaction checks; a `Vec` with a free list spends a third of
//! that. An operation's slot is only ever reached through its key, so entries moving when the
//! `Vec` grows is harmless.

use std::ops::{Deref, DerefMut};

/// Pre-allocated storage for a uniform data type
pub(crate) struct Slab<T> {
    entries: slab::Slab<T>,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Slab<T> {
    /// Create a new slab.
    pub(crate) const fn new() -> Slab<T> {
        Slab {
            entries: slab::Slab::new(),
        }
    }

    /// Get slab len.
    #[allow(unused)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn get(&mut self, key: usize) -> Option<Ref<'_, T>> {
        match self.entries.contains(key) {
            true => Some(Ref {
                entries: &mut self.entries,
                index: key,
            }),
            false => None,
        }
    }

    /// Insert an element into slab. The key is returned.
    pub(crate) fn insert(&mut self, val: T) -> usize {
        self.entries.insert(val)
    }

    /// Remove an element from slab.
    #[allow(unused)]
    pub(crate) fn remove(&mut self, key: usize) -> Option<T> {
        self.entries.try_remove(key)
    }
}

/// Ref point to a valid slot.
pub(crate) struct Ref<'a, T> {
    entries: &'a mut slab::Slab<T>,
    index: usize,
}

impl<'a, T> Ref<'a, T> {
    #[allow(unused)]
    pub(crate) fn remove(self) -> T {
        self.entries.remove(self.index)
    }
}

impl<'a, T> AsRef<T> for Ref<'a, T> {
    fn as_ref(&self) -> &T {
        // SAFETY: a `Ref` is only made for an occupied key, and it borrows the slab mutably,
        // so the entry cannot be removed while it lives.
        unsafe { self.entries.get_unchecked(self.index) }
    }
}

impl<'a, T> AsMut<T> for Ref<'a, T> {
    fn as_mut(&mut self) -> &mut T {
        // SAFETY: as in `as_ref`.
        unsafe { self.entries.get_unchecked_mut(self.index) }
    }
}

impl<'a, T> Deref for Ref<'a, T> {
    type Target = T;

    fn deref(&self) -> &Self::Target {
        self.as_ref()
    }
}

impl<'a, T> DerefMut for Ref<'a, T> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.as_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_get_remove_one() {
        let mut slab = Slab::default();
        let key = slab.insert(10);
        assert_eq!(slab.get(key).unwrap().as_mut(), &10);
        assert_eq!(slab.remove(key), Some(10));
        assert!(slab.get(key).is_none());
        assert_eq!(slab.len(), 0);
    }

    #[test]
    fn insert_get_remove_many() {
        let mut slab = Slab::new();
        let mut keys = vec![];

        for i in 0..10 {
            for j in 0..10 {
                let val = (i * 10) + j;

                let key = slab.insert(val);
                keys.push((key, val));
                assert_eq!(slab.get(key).unwrap().as_mut(), &val);
            }

            for (key, val) in keys.drain(..) {
                assert_eq!(val, slab.remove(key).unwrap());
            }
        }
    }

    #[test]
    fn get_not_exist() {
        let mut slab = Slab::<i32>::new();
        assert!(slab.get(0).is_none());
        assert!(slab.get(1).is_none());
        assert!(slab.get(usize::MAX).is_none());
        assert!(slab.remove(0).is_none());
        assert!(slab.remove(1).is_none());
        assert!(slab.remove(usize::MAX).is_none());
    }

    #[test]
    fn insert_remove_big() {
        let mut slab = Slab::default();
        let keys = (0..1_000_000).map(|i| slab.insert(i)).collect::<Vec<_>>();
        keys.iter().zip(0..1_000_000).for_each(|(key, val)| {
            assert_eq!(slab.remove(*key).unwrap(), val);
        });
        keys.iter().for_each(|key| {
            assert!(slab.get(*key).is_none());
        });
        assert_eq!(slab.len(), 0);
    }
}
