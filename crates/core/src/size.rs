//! Sizes for people: `"1GiB"`, `"500MB"` in `.pgtwig.toml` and environment
//! variables, and `1.5 GiB` in messages.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// 1536 → "1.5 KiB".
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// "64MiB", "1.5 GiB", "500MB", "2G", "1048576": a number and an optional
/// unit. KiB/MiB/GiB/TiB and K/M/G/T are powers of 1024, kB/MB/GB/TB
/// powers of 1000, B (or none) bytes; case does not matter.
pub fn parse(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = (t[..split].trim(), t[split..].trim());
    let bad = || {
        format!("\"{text}\" is not a size; write e.g. \"1GiB\", \"500MiB\", \"2GB\" or a number of bytes")
    };
    let value: f64 = number.parse().map_err(|_| bad())?;
    let factor: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(bad()),
    };
    let bytes = value * factor as f64;
    if !bytes.is_finite() || bytes > u64::MAX as f64 {
        return Err(bad());
    }
    Ok(bytes.round() as u64)
}

/// How much free space builds must leave on the file system of the project's
/// state (`free_space_margin` in `.pgtwig.toml`, `PGTWIG_FREE_SPACE_MARGIN`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreeSpaceMargin {
    /// At least this many bytes.
    Bytes(u64),
    /// No check at all (benchmarks; a build may then fill the disk under a running branch).
    Off,
}

impl std::str::FromStr for FreeSpaceMargin {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim().eq_ignore_ascii_case("off") {
            return Ok(FreeSpaceMargin::Off);
        }
        parse(s)
            .map(FreeSpaceMargin::Bytes)
            .map_err(|e| format!("{e}, or \"off\""))
    }
}

impl std::fmt::Display for FreeSpaceMargin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FreeSpaceMargin::Bytes(b) => write!(f, "{b}B"),
            FreeSpaceMargin::Off => f.write_str("off"),
        }
    }
}

impl Serialize for FreeSpaceMargin {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for FreeSpaceMargin {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_well() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(3 * 1024 * 1024 * 1024), "3.0 GiB");
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse("64MiB"), Ok(64 << 20));
        assert_eq!(parse("64 mib"), Ok(64 << 20));
        assert_eq!(parse("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse("2G"), Ok(2 << 30));
        assert_eq!(parse("500MB"), Ok(500_000_000));
        assert_eq!(parse("4096"), Ok(4096));
        assert_eq!(parse("0"), Ok(0));
        for bad in ["", "MiB", "1 parsec", "-1GiB", "1..2G"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn margins_parse() {
        assert_eq!("off".parse(), Ok(FreeSpaceMargin::Off));
        assert_eq!(" OFF ".parse(), Ok(FreeSpaceMargin::Off));
        assert_eq!("2GiB".parse(), Ok(FreeSpaceMargin::Bytes(2 << 30)));
        let e = "lots".parse::<FreeSpaceMargin>().unwrap_err();
        assert!(e.contains("\"off\""), "{e}");
    }
}
