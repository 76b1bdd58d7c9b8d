//! The engine through its public handle, on real data directories.

use engine::{AccountId, Transfer, TransferResult};
use qepik_tests::{block_on, open, world};

#[test]
fn transfers_survive_a_restart_and_stay_balanced() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    {
        let engine = open(dir.path(), 2)?;
        world(&engine, 10, 1000)?;
        let batch: Vec<Transfer> =
            (1..=9).map(|i| Transfer::new(u128::from(i), AccountId(i), AccountId(i + 1), 100)).collect();
        let results = engine.submit_blocking(batch)?;
        assert!(results.iter().all(|r| *r == TransferResult::Ok), "{results:?}");
        engine.shutdown();
    }
    let engine = open(dir.path(), 2)?;
    let accounts = block_on(engine.lookup_accounts(&[AccountId(1), AccountId(5), AccountId(10)]))?;
    let balances: Vec<i128> = accounts.iter().map(|a| a.map_or(-1, |a| a.balance_posted())).collect();
    assert_eq!(balances, [900, 1000, 1100]);
    let totals = engine.totals()?;
    assert!(totals.values().all(|t| t.balanced()), "{totals:?}");
    Ok(())
}
