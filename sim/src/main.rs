//! `simulate --seed N --steps M [--seeds K]`: runs the simulation for seeds N, N+1, ... N+K-1,
//! M steps each, against a fresh database per seed; prints what ran and, for a violation, the
//! step, what disagreed and the command that replays it (exit 1).

use clap::Parser;

#[derive(Parser)]
#[command(about = "A seeded, model-based simulation of the billing core")]
struct Args {
    /// The first seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Steps per seed.
    #[arg(long, default_value_t = 500)]
    steps: u64,
    /// How many seeds, from `--seed` on.
    #[arg(long, default_value_t = 1)]
    seeds: u64,
    /// Steps between deep checks (read models, books, hash chain, replays of every read model).
    #[arg(long, default_value_t = sim::DEEP_CHECK_EVERY)]
    deep_every: u64,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let started = std::time::Instant::now();
    let mut steps = 0;
    let mut events = 0;
    for seed in args.seed..args.seed + args.seeds {
        let options = sim::Options {
            seed,
            steps: args.steps,
            deep_check_every: args.deep_every,
        };
        match sim::run(options).await {
            Ok(report) => {
                steps += report.steps;
                events += report.events;
                let mut operations: Vec<_> = report.operations.iter().collect();
                operations.sort();
                println!(
                    "seed {seed}: {} steps, {} events, {} days simulated, no violation; {operations:?}",
                    report.steps,
                    report.events,
                    report.simulated.num_days()
                );
            }
            Err(violation) => {
                eprintln!("seed {seed}: {violation}");
                return std::process::ExitCode::FAILURE;
            }
        }
    }
    println!(
        "{} seeds, {steps} steps, {events} events, 0 violations in {:.0} s",
        args.seeds,
        started.elapsed().as_secs_f64()
    );
    std::process::ExitCode::SUCCESS
}
