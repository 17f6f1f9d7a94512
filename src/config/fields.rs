//! A TOML table walker that records every problem instead of stopping at the first.
//!
//! serde's derive stops at the first error and `deny_unknown_fields` names only one unknown
//! key, so a user fixing a config would learn of its mistakes one run at a time. Here each
//! field is read on its own, every failure is pushed to [`Errors`] with its full key path
//! (`services.users.instances[1]`), and [`Section::finish`] reports every key nobody asked for.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use toml::{Table, Value};

/// One problem in a config file, at a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError {
    /// Dotted key path, e.g. `services.users.request_timeout`.
    pub key: String,
    pub message: String,
}

/// Every problem found so far.
#[derive(Debug, Default)]
pub struct Errors(pub Vec<KeyError>);

impl Errors {
    pub fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(KeyError {
            key: key.into(),
            message: message.into(),
        });
    }
}

/// A value that can be read from a TOML value, with a message for the user when it cannot.
pub trait FromToml: Sized {
    fn from_toml(value: &Value) -> Result<Self, String>;
}

fn type_error(expected: &str, found: &Value) -> String {
    format!("expected {expected}, found {}", found.type_str())
}

impl FromToml for String {
    fn from_toml(value: &Value) -> Result<Self, String> {
        value
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| type_error("a string", value))
    }
}

impl FromToml for bool {
    fn from_toml(value: &Value) -> Result<Self, String> {
        value
            .as_bool()
            .ok_or_else(|| type_error("a boolean", value))
    }
}

impl FromToml for u64 {
    fn from_toml(value: &Value) -> Result<Self, String> {
        let n = value
            .as_integer()
            .ok_or_else(|| type_error("an integer", value))?;
        u64::try_from(n).map_err(|_| format!("expected a non-negative integer, found {n}"))
    }
}

impl FromToml for u32 {
    fn from_toml(value: &Value) -> Result<Self, String> {
        let n = u64::from_toml(value)?;
        u32::try_from(n).map_err(|_| format!("{n} is too large"))
    }
}

impl FromToml for usize {
    fn from_toml(value: &Value) -> Result<Self, String> {
        let n = u64::from_toml(value)?;
        usize::try_from(n).map_err(|_| format!("{n} is too large"))
    }
}

impl FromToml for Duration {
    fn from_toml(value: &Value) -> Result<Self, String> {
        let text = value
            .as_str()
            .ok_or_else(|| type_error("a duration string such as \"500ms\" or \"2s\"", value))?;
        humantime::parse_duration(text).map_err(|e| format!("invalid duration {text:?}: {e}"))
    }
}

impl FromToml for SocketAddr {
    fn from_toml(value: &Value) -> Result<Self, String> {
        let text = value
            .as_str()
            .ok_or_else(|| type_error("an address such as \"127.0.0.1:8080\"", value))?;
        parse_socket_addr(text)
    }
}

/// `ip:port`; a host name is refused because a listener binds an address, not a name.
pub fn parse_socket_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse()
        .map_err(|_| format!("invalid address {text:?}: expected ip:port such as 0.0.0.0:8080"))
}

/// A share written as a percentage with at most one decimal (`"10%"`, `"2.5%"`), held in
/// thousandths so the pure cores it reaches stay in integers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permille(pub u16);

impl FromToml for Permille {
    fn from_toml(value: &Value) -> Result<Self, String> {
        let expected = "a percentage such as \"10%\" or \"2.5%\"";
        let text = value.as_str().ok_or_else(|| type_error(expected, value))?;
        let invalid = || format!("invalid percentage {text:?}: expected {expected}");
        let number = text.trim().strip_suffix('%').ok_or_else(invalid)?;
        let (whole, tenths) = match number.split_once('.') {
            Some((whole, tenth)) if tenth.len() == 1 => (whole, tenth),
            Some(_) => return Err(invalid()),
            None => (number, "0"),
        };
        let digits = |part: &str| -> Result<u16, String> {
            if part.is_empty() || part.len() > 3 || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid());
            }
            part.parse().map_err(|_| invalid())
        };
        let permille = digits(whole)? * 10 + digits(tenths)?;
        if permille > 1000 {
            return Err(format!("{text:?} is more than 100%"));
        }
        Ok(Permille(permille))
    }
}

/// A size in bytes: an integer, or a string with a unit (`"512KiB"`, `"10MiB"`, `"1GB"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl FromToml for ByteSize {
    fn from_toml(value: &Value) -> Result<Self, String> {
        if let Some(n) = value.as_integer() {
            return u64::try_from(n)
                .map(ByteSize)
                .map_err(|_| format!("expected a non-negative size, found {n}"));
        }
        let text = value
            .as_str()
            .ok_or_else(|| type_error("a size such as 1048576 or \"10MiB\"", value))?;
        parse_byte_size(text).map(ByteSize)
    }
}

pub fn parse_byte_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(split);
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("invalid size {text:?}: expected digits then a unit"))?;
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" => 1_000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        other => {
            return Err(format!(
                "invalid size unit {other:?} in {text:?}: use B, KB, KiB, MB, MiB, GB or GiB"
            ));
        }
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("size {text:?} is too large"))
}

impl<T: FromToml> FromToml for Vec<T> {
    fn from_toml(value: &Value) -> Result<Self, String> {
        let items = value
            .as_array()
            .ok_or_else(|| type_error("an array", value))?;
        items
            .iter()
            .enumerate()
            .map(|(i, item)| T::from_toml(item).map_err(|e| format!("[{i}]: {e}")))
            .collect()
    }
}

/// A table being read, with its key path and the keys read so far.
pub struct Section<'t> {
    path: String,
    table: &'t Table,
    seen: BTreeSet<&'t str>,
}

impl<'t> Section<'t> {
    pub fn root(table: &'t Table) -> Self {
        Self::at(String::new(), table)
    }

    fn at(path: String, table: &'t Table) -> Self {
        Self {
            path,
            table,
            seen: BTreeSet::new(),
        }
    }

    /// This table's own key path.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The full path of a key of this table.
    pub fn key(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn take(&mut self, key: &str) -> Option<&'t Value> {
        let (name, value) = self.table.get_key_value(key)?;
        self.seen.insert(name.as_str());
        Some(value)
    }

    /// Whether the key is present at all (read or not).
    pub fn has(&self, key: &str) -> bool {
        self.table.contains_key(key)
    }

    /// A key that may be absent; an invalid value is an error and reads as absent.
    pub fn optional<T: FromToml>(&mut self, key: &str, errors: &mut Errors) -> Option<T> {
        let value = self.take(key)?;
        match T::from_toml(value) {
            Ok(parsed) => Some(parsed),
            Err(message) => {
                errors.push(self.key(key), message);
                None
            }
        }
    }

    /// A key that must be present.
    pub fn required<T: FromToml>(&mut self, key: &str, errors: &mut Errors) -> Option<T> {
        if !self.table.contains_key(key) {
            errors.push(self.key(key), "missing required key");
            return None;
        }
        self.optional(key, errors)
    }

    /// A key with a default when absent. An invalid value is reported and the default is
    /// returned so validation can go on and find further errors.
    pub fn or<T: FromToml>(&mut self, key: &str, default: T, errors: &mut Errors) -> T {
        self.optional(key, errors).unwrap_or(default)
    }

    /// A sub-table, if present and a table.
    pub fn table(&mut self, key: &str, errors: &mut Errors) -> Option<Section<'t>> {
        let value = self.take(key)?;
        match value.as_table() {
            Some(table) => Some(Section::at(self.key(key), table)),
            None => {
                errors.push(self.key(key), type_error("a table", value));
                None
            }
        }
    }

    /// An array of tables (`[[key]]`), each with its indexed path (`key[0]`).
    pub fn array_of_tables(&mut self, key: &str, errors: &mut Errors) -> Vec<Section<'t>> {
        let Some(value) = self.take(key) else {
            return Vec::new();
        };
        let Some(items) = value.as_array() else {
            errors.push(self.key(key), type_error("an array of tables", value));
            return Vec::new();
        };
        let mut sections = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let path = format!("{}[{i}]", self.key(key));
            match item.as_table() {
                Some(table) => sections.push(Section::at(path, table)),
                None => errors.push(path, type_error("a table", item)),
            }
        }
        sections
    }

    /// The keys of this table, for tables whose keys are names (`[policies.NAME]`).
    pub fn sub_keys_of_self(&self) -> Vec<String> {
        self.table.keys().cloned().collect()
    }

    /// Reports every key of this table that no reader asked for.
    pub fn finish(self, errors: &mut Errors) {
        for key in self.table.keys() {
            if !self.seen.contains(key.as_str()) {
                errors.push(self.key(key), "unknown key");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages() {
        let read = |text: &str| Permille::from_toml(&Value::String(text.into())).map(|p| p.0);
        assert_eq!(read("10%"), Ok(100));
        assert_eq!(read("2.5%"), Ok(25));
        assert_eq!(read(" 0% "), Ok(0));
        assert_eq!(read("100%"), Ok(1000));
        assert!(read("100.1%").unwrap_err().contains("more than 100%"));
        for bad in [
            "10", "%", "1.25%", "-1%", ".5%", "5.%", "1e2%", "10000%", "ten%",
        ] {
            assert!(read(bad).is_err(), "{bad}");
        }
        assert!(Permille::from_toml(&Value::Float(0.1)).is_err());
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_byte_size("10MiB"), Ok(10 << 20));
        assert_eq!(parse_byte_size("512"), Ok(512));
        assert_eq!(parse_byte_size("1 GB"), Ok(1_000_000_000));
        assert!(parse_byte_size("10 parsecs").is_err());
        assert!(parse_byte_size("MiB").is_err());
        assert!(parse_byte_size("99999999999999999999GiB").is_err());
    }

    #[test]
    fn section_reports_unknown_missing_and_wrong_types_together() {
        let table: Table =
            toml::from_str("a = 1\nb = \"x\"\nextra = true\n[sub]\nc = 2\nz = 3").unwrap();
        let mut errors = Errors::default();
        let mut root = Section::root(&table);
        assert_eq!(root.required::<u64>("a", &mut errors), Some(1));
        assert_eq!(root.required::<u64>("b", &mut errors), None);
        assert_eq!(root.required::<u64>("missing", &mut errors), None);
        let mut sub = root.table("sub", &mut errors).unwrap();
        assert_eq!(sub.or::<u64>("c", 0, &mut errors), 2);
        sub.finish(&mut errors);
        root.finish(&mut errors);
        let keys: Vec<_> = errors.0.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["b", "missing", "sub.z", "extra"]);
    }

    #[test]
    fn array_errors_name_the_index() {
        let value = Value::Array(vec![Value::from("1s"), Value::from(3)]);
        let err = Vec::<Duration>::from_toml(&value).unwrap_err();
        assert!(err.starts_with("[1]:"), "{err}");
    }
}
