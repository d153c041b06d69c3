//! Human-readable quantities.

use std::fmt;

/// A byte count shown as an exact number plus binary units where that
/// helps: `16449536 bytes (15.7 MiB)`.
#[derive(Debug, Clone, Copy)]
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        if n < 1024 {
            return write!(f, "{n} bytes");
        }
        const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
        let mut value = n as f64 / 1024.0;
        let mut unit = 0;
        while value >= 1024.0 && unit + 1 < UNITS.len() {
            value /= 1024.0;
            unit += 1;
        }
        write!(f, "{n} bytes ({value:.1} {})", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::Bytes;

    #[test]
    fn small_counts_are_plain_bytes() {
        assert_eq!(Bytes(0).to_string(), "0 bytes");
        assert_eq!(Bytes(1023).to_string(), "1023 bytes");
    }

    #[test]
    fn larger_counts_add_binary_units() {
        assert_eq!(Bytes(16449536).to_string(), "16449536 bytes (15.7 MiB)");
        assert_eq!(Bytes(1 << 30).to_string(), "1073741824 bytes (1.0 GiB)");
    }
}
