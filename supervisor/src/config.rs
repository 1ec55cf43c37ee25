//! `shadowback up CONFIG.toml`: which disks to serve and where.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::SupervisorError;

/// How the disk image is opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// `O_DIRECT`: guest I/O bypasses the host page cache (the default, as
    /// for production VM disks).
    #[default]
    None,
    /// Buffered through the host page cache; flushes still `fdatasync`.
    Writeback,
}

/// One disk to export.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Device name guests ask for (`device=` key).
    pub name: String,
    /// Image file; its size (a multiple of 512 bytes) is the disk size.
    pub path: PathBuf,
    #[serde(default)]
    pub cache: CacheMode,
    #[serde(default)]
    pub readonly: bool,
    /// Domain id the backend uses (what guests name in their grants).
    #[serde(default)]
    pub backend_id: u16,
    /// Largest ring a guest may set up (`max-ring-page-order`, 0–4).
    #[serde(default = "default_ring_order")]
    pub max_ring_page_order: u8,
    /// Offer `feature-discard` (hole punching).
    #[serde(default = "default_true")]
    pub discard: bool,
}

fn default_ring_order() -> u8 {
    4
}

fn default_true() -> bool {
    true
}

/// The whole supervisor configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Control socket guests connect to.
    pub socket: PathBuf,
    #[serde(default, rename = "disk")]
    pub disks: Vec<DiskConfig>,
}

impl Config {
    /// Reads and validates a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, SupervisorError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| SupervisorError::Config(format!("{}: {e}", path.display())))?;
        Self::parse(&text)
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Self, SupervisorError> {
        let cfg: Config =
            toml::from_str(text).map_err(|e| SupervisorError::Config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Names are unique and usable as key values, ring orders in range.
    pub fn validate(&self) -> Result<(), SupervisorError> {
        if self.disks.is_empty() {
            return Err(SupervisorError::Config("no [[disk]] configured".into()));
        }
        for (i, d) in self.disks.iter().enumerate() {
            let ok_name = !d.name.is_empty()
                && d.name.len() <= 64
                && d.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !ok_name {
                return Err(SupervisorError::Config(format!(
                    "disk name {:?}: use 1-64 characters of [A-Za-z0-9_-]",
                    d.name
                )));
            }
            if self.disks[..i].iter().any(|o| o.name == d.name) {
                return Err(SupervisorError::Config(format!(
                    "disk name {:?} used twice",
                    d.name
                )));
            }
            if d.max_ring_page_order > 4 {
                return Err(SupervisorError::Config(format!(
                    "disk {:?}: max_ring_page_order {} is above 4",
                    d.name, d.max_ring_page_order
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_example() {
        let cfg = Config::parse(
            r#"
            socket = "/run/shadowback/control.sock"
            [[disk]]
            name = "disk0"
            path = "/var/lib/shadowback/disk0.img"
            cache = "writeback"
            [[disk]]
            name = "scratch"
            path = "/tmp/scratch.img"
            readonly = true
            "#,
        )
        .unwrap();
        assert_eq!(cfg.disks.len(), 2);
        assert_eq!(cfg.disks[0].cache, CacheMode::Writeback);
        assert_eq!(cfg.disks[1].cache, CacheMode::None);
        assert!(cfg.disks[1].readonly);
        assert_eq!(cfg.disks[1].max_ring_page_order, 4);
    }

    #[test]
    fn rejects_bad_configs() {
        for bad in [
            "socket = \"/s\"",
            "socket = \"/s\"\n[[disk]]\nname = \"a b\"\npath = \"/x\"",
            "socket = \"/s\"\n[[disk]]\nname = \"a\"\npath = \"/x\"\n[[disk]]\nname = \"a\"\npath = \"/y\"",
            "socket = \"/s\"\n[[disk]]\nname = \"a\"\npath = \"/x\"\nmax_ring_page_order = 5",
            "socket = \"/s\"\n[[disk]]\nname = \"a\"\npath = \"/x\"\ncolour = 1",
            "socket = \"/s\"\n[[disk]]\nname = \"a\"\npath = \"/x\"\ncache = \"sometimes\"",
        ] {
            assert!(Config::parse(bad).is_err(), "accepted: {bad}");
        }
    }
}

#[cfg(test)]
mod fixture_tests {
    use super::*;

    #[test]
    fn the_shipped_example_config_is_valid() {
        let cfg = Config::parse(include_str!("../../fixtures/shadowback.toml")).unwrap();
        assert_eq!(cfg.disks[0].name, "disk0");
        assert_eq!(cfg.disks[0].cache, CacheMode::None);
    }
}
