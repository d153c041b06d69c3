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

/// A duration shown in the largest unit that keeps it readable: `250 us`,
/// `5 ms`, `1.5 s`, `15 s`.
#[derive(Debug, Clone, Copy)]
pub struct Elapsed(pub std::time::Duration);

impl fmt::Display for Elapsed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        let (value, unit) = if d < std::time::Duration::from_millis(1) {
            return write!(f, "{} us", d.as_micros());
        } else if d < std::time::Duration::from_secs(1) {
            (d.as_secs_f64() * 1e3, "ms")
        } else {
            (d.as_secs_f64(), "s")
        };
        let text = format!("{value:.3}");
        let text = text.trim_end_matches('0').trim_end_matches('.');
        write!(f, "{text} {unit}")
    }
}

/// Parses a size: a number of bytes, or a number with a binary suffix
/// `K`, `M`, `G`, `T` (optionally `KiB`, `MiB`, ...): `128M`, `1GiB`, `4096`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, suffix) = t.split_at(digits);
    let n: u64 = number.parse().map_err(|_| {
        format!("{text:?} is not a size: write bytes, or a number with K, M, G or T")
    })?;
    let shift = match suffix.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => {
            return Err(format!(
                "{text:?} has an unknown unit: use K, M, G or T (powers of 1024)"
            ));
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// Parses a duration: a number with `us`, `ms`, `s` or `m`: `5ms`, `15s`.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration: write a number with us, ms, s or m"))?;
    use std::time::Duration;
    match unit.trim() {
        // Zero is zero in every unit (`status --watch 0`).
        "" if n == 0 => Ok(Duration::ZERO),
        "us" => Ok(Duration::from_micros(n)),
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n.saturating_mul(60))),
        _ => Err(format!(
            "{text:?} needs a unit: us, ms, s or m (say 5ms or 15s)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::{Bytes, parse_duration, parse_size};

    #[test]
    fn durations_need_a_unit() {
        use std::time::Duration;
        assert_eq!(parse_duration("5ms"), Ok(Duration::from_millis(5)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("5").is_err());
        assert_eq!(parse_duration("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("15").is_err());
        assert!(parse_duration("fast").is_err());
    }

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("128M"), Ok(128 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2k"), Ok(2048));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

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

    #[test]
    fn durations_show_in_a_readable_unit() {
        use std::time::Duration;

        use super::Elapsed;
        assert_eq!(Elapsed(Duration::from_micros(250)).to_string(), "250 us");
        assert_eq!(Elapsed(Duration::from_millis(5)).to_string(), "5 ms");
        assert_eq!(Elapsed(Duration::from_micros(1500)).to_string(), "1.5 ms");
        assert_eq!(Elapsed(Duration::from_millis(1500)).to_string(), "1.5 s");
        assert_eq!(Elapsed(Duration::from_secs(15)).to_string(), "15 s");
    }
}
