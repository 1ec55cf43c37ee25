//! Temporary directories and disk images, removed on drop.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// `<system temp dir>/sbt-<tag>-<pid>-<n>`: unique within this process and
/// across concurrent test binaries.
fn unique_path(tag: &str, suffix: &str) -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("sbt-{tag}-{}-{n}{suffix}", std::process::id()))
}

/// A directory under the system temp dir, removed (with its content) on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let path = unique_path(tag, "");
        // A leftover of an earlier run with the same pid.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `name` inside the directory.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }

    /// Creates the sparse image `name` of `bytes` bytes in the directory.
    pub fn create_image(&self, name: &str, bytes: u64) -> PathBuf {
        let path = self.join(name);
        make_image(&path, bytes);
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Creates (or truncates) a sparse image of `bytes` bytes at `path`.
pub fn make_image(path: &Path, bytes: u64) {
    File::create(path)
        .and_then(|f| f.set_len(bytes))
        .expect("create disk image");
}

/// A sparse disk image under the system temp dir, open read-write and
/// removed on drop.
#[derive(Debug)]
pub struct TempImage {
    pub path: PathBuf,
    pub file: File,
}

impl TempImage {
    pub fn new(tag: &str, bytes: u64) -> Self {
        let path = unique_path(tag, ".img");
        let _ = std::fs::remove_file(&path);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .expect("create temp image");
        file.set_len(bytes).expect("size temp image");
        TempImage { path, file }
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_temp_dir_and_its_content_are_removed_on_drop() {
        let dir = TempDir::new("tsup");
        let image = dir.create_image("disk.img", 1 << 20);
        assert_eq!(std::fs::metadata(&image).unwrap().len(), 1 << 20);
        let path = dir.path().to_path_buf();
        drop(dir);
        assert!(!path.exists());
    }

    #[test]
    fn temp_images_are_distinct_and_removed_on_drop() {
        let a = TempImage::new("tsup", 4096);
        let b = TempImage::new("tsup", 8192);
        assert_ne!(a.path, b.path);
        assert_eq!(b.file.metadata().unwrap().len(), 8192);
        let path = a.path.clone();
        drop(a);
        assert!(!path.exists());
    }
}
