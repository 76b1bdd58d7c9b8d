//! The process's memory policy, which every binary that runs the engine applies first
//! ([`disable_transparent_huge_pages`]).

/// The environment variable that keeps transparent huge pages on (`QEPIK_ALLOW_THP=1`).
pub const ALLOW_THP_ENV: &str = "QEPIK_ALLOW_THP";

/// Turns transparent huge pages off for this process (`prctl(PR_SET_THP_DISABLE)`, kept
/// across `fork` and `exec`), unless [`ALLOW_THP_ENV`] is `1`. Returns whether it did.
///
/// Why: mimalloc asks for huge pages on its arenas (`MADV_HUGEPAGE`), and the ledger's tables
/// are hundreds of MB touched at random. Measured here (bench/RESULTS.md): with huge pages,
/// 10M accounts held ~90 MiB more (2 MiB pages half used at the edges of freed table parts),
/// and the in-memory apply bench ran 2.2–5.3M transfers/s where it ran 7.7–9.1M without them,
/// the kernel compacting memory for new huge pages on the two cores the shards use. On a
/// kernel without the call (not Linux), nothing happens.
pub fn disable_transparent_huge_pages() -> std::io::Result<bool> {
    if std::env::var(ALLOW_THP_ENV).is_ok_and(|value| value == "1") {
        return Ok(false);
    }
    disable()
}

#[cfg(target_os = "linux")]
fn disable() -> std::io::Result<bool> {
    rustix::thread::disable_transparent_huge_pages(true)?;
    Ok(true)
}

#[cfg(not(target_os = "linux"))]
fn disable() -> std::io::Result<bool> {
    Ok(false)
}

#[cfg(test)]
mod tests {
    #[cfg(target_os = "linux")]
    #[test]
    fn huge_pages_are_off_once_disabled() -> std::io::Result<()> {
        if std::env::var(super::ALLOW_THP_ENV).is_ok_and(|value| value == "1") {
            return Ok(());
        }
        assert!(super::disable_transparent_huge_pages()?);
        assert!(rustix::thread::transparent_huge_pages_are_disabled()?);
        Ok(())
    }
}
