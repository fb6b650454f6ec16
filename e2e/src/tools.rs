//! Where the external tools (`.tools/bin`, made by `scripts/setup.sh`) and
//! this workspace's own binaries (`target/<profile>/`) are.

use std::path::PathBuf;

use anyhow::bail;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("e2e lives in the workspace").to_path_buf()
}

/// An external tool: `.tools/bin/<name>` (or `$CILIUM_RS_TOOLS/<name>`).
pub fn tool(name: &str) -> anyhow::Result<PathBuf> {
    let dir =
        std::env::var_os("CILIUM_RS_TOOLS").map(PathBuf::from).unwrap_or_else(|| workspace_root().join(".tools/bin"));
    let path = dir.join(name);
    if !path.exists() {
        bail!("{} not found: run scripts/setup.sh first", path.display());
    }
    Ok(path)
}

/// A binary of this workspace, built next to the running executable
/// (`target/<profile>/<name>`; test executables live one level deeper, in
/// `deps/`). Build them first: `cargo build --workspace --bins`.
pub fn workspace_bin(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().expect("exe has a parent").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    if !path.exists() {
        bail!("{} not found: run `cargo build --workspace --bins` first", path.display());
    }
    Ok(path)
}
