//! Temporary disk images for `demo` and the benchmarks.

use std::path::{Path, PathBuf};

use crate::CliError;

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// `<parent or the system temp dir>/shadowback-<what>-<pid>`.
    pub fn new(parent: Option<&Path>, what: &str) -> Result<Self, CliError> {
        let base = parent
            .map(Path::to_path_buf)
            .unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!("shadowback-{what}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
