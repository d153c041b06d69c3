//! The numbers the protocol gives names to, each its own type so that a
//! host id cannot be passed where a slot is meant, nor an epoch where a
//! generation is: [`HostId`], [`Slot`], [`Epoch`], [`Generation`].
//!
//! Each wraps the integer the format stores (docs/format.md) and converts
//! both ways with `From`; `get()` gives the integer. Serialized (serde) as
//! that integer. None of them checks a
//! range on construction: the record codecs check the ranges the format
//! sets (host 1..=`max_hosts`, slot 1..=31, epoch and generation at least 1
//! where a record requires it) and say which field is wrong.

use core::fmt;

macro_rules! protocol_number {
    ($(#[$meta:meta])* $name:ident($int:ty)) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
        #[derive(serde::Serialize, serde::Deserialize)]
        #[serde(transparent)]
        #[cfg_attr(feature = "defmt", derive(defmt::Format))]
        #[repr(transparent)]
        pub struct $name($int);

        impl $name {
            /// The value `value`.
            pub const fn new(value: $int) -> Self {
                Self(value)
            }

            /// The integer the format stores.
            pub const fn get(self) -> $int {
                self.0
            }
        }

        impl From<$int> for $name {
            fn from(value: $int) -> Self {
                Self(value)
            }
        }

        impl From<$name> for $int {
            fn from(value: $name) -> Self {
                value.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        const _: () = assert!(core::mem::size_of::<$name>() == core::mem::size_of::<$int>());
    };
}

protocol_number!(
    /// A host's id in the mailbox, 1..=[`MAX_HOSTS`](super::MAX_HOSTS);
    /// 0 means "not a host" (an SPM header written by a storage array).
    HostId(u16)
);

protocol_number!(
    /// A slot in a host area, 1..=[`SLOTS_PER_AREA`](super::SLOTS_PER_AREA);
    /// the record index of a request or reply (0 is the area header).
    Slot(u16)
);

protocol_number!(
    /// An SPM's epoch: raised by every SPM that takes over, carried in its
    /// header, outbox headers and replies. 0 only before any SPM ran.
    Epoch(u64)
);

protocol_number!(
    /// A host's generation: raised on every start of the host, carried in
    /// its inbox header and requests and echoed in replies; at least 1.
    Generation(u64)
);

impl HostId {
    /// "Not a host".
    pub const NONE: HostId = HostId(0);
}

impl Epoch {
    /// No SPM ever ran.
    pub const ZERO: Epoch = Epoch(0);

    /// The epoch after this one, or `None` at the end of the range.
    pub const fn next(self) -> Option<Epoch> {
        match self.0.checked_add(1) {
            Some(e) => Some(Epoch(e)),
            None => None,
        }
    }
}

impl Generation {
    /// The generation after this one, or `None` at the end of the range.
    pub const fn next(self) -> Option<Generation> {
        match self.0.checked_add(1) {
            Some(g) => Some(Generation(g)),
            None => None,
        }
    }
}

impl Slot {
    /// The slot's position among the area's slots, 0..31 (slot 1 is 0).
    /// `None` for 0, which is the area header and no slot.
    pub const fn position(self) -> Option<usize> {
        match self.0.checked_sub(1) {
            Some(p) => Some(p as usize),
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn convert_both_ways_and_print_as_the_integer() {
        let h = HostId::from(7);
        assert_eq!(u16::from(h), 7);
        assert_eq!(h.get(), 7);
        let mut s = heapless::String::<16>::new();
        core::fmt::write(&mut s, format_args!("{h}/{}", Epoch::new(12))).unwrap();
        assert_eq!(s.as_str(), "7/12");
        assert_eq!(Epoch::new(u64::MAX).next(), None);
        assert_eq!(Generation::new(1).next(), Some(Generation::new(2)));
        assert_eq!(Slot::new(0).position(), None);
        assert_eq!(Slot::new(31).position(), Some(30));
    }
}
