//! The simulation on fixed seeds, a few hundred steps in all (long runs are made with the
//! `simulate` binary and recorded in RELIABILITY.md).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_seeds_run_without_a_violation() {
    for seed in [1, 2, 3] {
        let report = sim::run(sim::Options {
            seed,
            steps: 150,
            deep_check_every: 50,
        })
        .await
        .unwrap_or_else(|violation| panic!("seed {seed}: {violation}"));
        assert_eq!(report.steps, 150);
        // The run did more than open accounts: money moved and time passed.
        assert!(report.events > 150, "seed {seed}: {report:?}");
        assert!(report.simulated > chrono::Duration::hours(12), "seed {seed}: {report:?}");
    }
}
