//! PostgreSQL log sequence numbers.

use std::fmt;
use std::str::FromStr;

/// A position in PostgreSQL's write-ahead log, printed as `X/Y` like the server does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(
    /// Byte offset into the WAL.
    pub u64,
);

impl Lsn {
    /// `0/0`, before any WAL: "no position yet".
    pub const ZERO: Lsn = Lsn(0);

    /// The position as a byte offset into the WAL.
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// Text that is not an LSN in `X/Y` form; the message quotes it.
#[derive(Debug, thiserror::Error)]
#[error("invalid LSN {0:?}: expected two hexadecimal numbers separated by '/', such as 0/16B3748")]
pub struct ParseLsnError(String);

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseLsnError(s.to_string());
        let (hi, lo) = s.trim().split_once('/').ok_or_else(err)?;
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

impl From<u64> for Lsn {
    fn from(v: u64) -> Self {
        Lsn(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_text() {
        for v in [0u64, 1, 0x16B3748, 0x1_0000_0000, u64::MAX] {
            let lsn = Lsn(v);
            assert_eq!(lsn.to_string().parse::<Lsn>().unwrap(), lsn);
        }
        assert_eq!("0/16B3748".parse::<Lsn>().unwrap(), Lsn(0x16B3748));
        assert!("16B3748".parse::<Lsn>().is_err());
        assert!("x/1".parse::<Lsn>().is_err());
    }
}
