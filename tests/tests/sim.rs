//! The deterministic simulation of hosts and the SPM on a faulty shared
//! disk (see `spmbox_tests::sim`): every SPM and host is the core's driver
//! (`SpmDriver`, `HostDriver`) running its real engine on a simulated
//! block device, as the daemons and firmware run them.
//!
//! - `cargo test -p spmbox-tests --test sim` runs a modest number of seeds;
//!   `SPMBOX_SIM_SEEDS=N` runs N seeds instead, starting at
//!   `SPMBOX_SIM_FIRST_SEED` (default 0). Many seeds run in the dev
//!   profile, debug assertions on (the workspace optimizes the core and
//!   the simulation there): `SPMBOX_SIM_SEEDS=10000 cargo test -p
//!   spmbox-tests --test sim -- every_seed`, about 25 minutes on two
//!   cores; split it with `SPMBOX_SIM_FIRST_SEED`.
//! - `SPMBOX_SIM_SEED=S cargo test -p spmbox-tests --test sim -- --nocapture replay`
//!   replays one seed and prints its report.

use std::time::Duration;

use spmbox_tests::sim::{
    Bug, Faults, Lifecycle, MetadataFault, Scenario, SuperblockDamage, Withdraw, run, run_seed,
};

const DEFAULT_SEEDS: u64 = 64;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn every_seed_keeps_safety_and_liveness_under_faults() {
    let seeds = env_u64("SPMBOX_SIM_SEEDS").unwrap_or(DEFAULT_SEEDS);
    let first = env_u64("SPMBOX_SIM_FIRST_SEED").unwrap_or(0);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut out = Vec::new();
                    let mut seed = first + t;
                    while seed < first + seeds {
                        out.push((seed, run_seed(seed)));
                        seed += threads;
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("simulation thread"))
            .collect()
    });
    let mut failures = Vec::new();
    let (mut extensions, mut pauses, mut resumes, mut crashes, mut faults) = (0, 0, 0, 0, 0);
    let (mut metadata_faults, mut rollbacks_refused, mut evictions) = (0, 0, 0);
    let (mut lifecycles, mut closes, mut deletes, mut reduces) = (0, 0, 0, 0);
    let (mut refused_held, mut refused_parked, mut holds_unseen) = (0, 0, 0);
    let (mut refused_closing, mut starts_with_released, mut unseen_starting) = (0, 0, 0);
    let (mut reclaimed, mut acks, mut stopped, mut retracted) = (0, 0, 0, 0);
    let (mut removal_seeds, mut started, mut finished, mut refused) = (0, 0, 0, 0);
    let (mut refused_moving, mut interrupted, mut moved, mut cleared) = (0, 0, 0, 0);
    let (mut reopens, mut waited, mut hold_unseen) = (0, 0, 0);
    for (seed, result) in &results {
        match result {
            Ok(r) => {
                if Scenario::from_seed(*seed).lifecycle.is_some() {
                    lifecycles += 1;
                }
                if Scenario::from_seed(*seed).lun_removal.is_some() {
                    removal_seeds += 1;
                }
                started += r.lun_removals_started;
                finished += r.lun_removals_finished;
                refused += r.lun_removals_refused;
                refused_moving += r.moves_refused_held;
                interrupted += r.lun_removals_interrupted;
                moved += r.segments_moved;
                cleared += r.moving_cleared_at_start;
                reopens += r.reopens;
                waited += r.reopens_waited;
                hold_unseen += r.moves_hold_unseen;
                closes += r.closes;
                deletes += r.deletes;
                reduces += r.reduces;
                refused_held += r.refused_held;
                refused_closing += r.refused_closing;
                unseen_starting += r.holds_unseen_starting;
                starts_with_released += r.starts_with_released;
                refused_parked += r.refused_parked;
                holds_unseen += r.holds_unseen;
                reclaimed += r.reclaimed;
                retracted += r.replies_retracted;
                acks += r.acks;
                stopped += r.stopped;
                extensions += r.extensions;
                pauses += r.pauses;
                resumes += r.resumes;
                crashes += r.crashes;
                faults += r.faults.torn + r.faults.lost + r.faults.misdirected + r.faults.bitflips;
                metadata_faults += r.metadata_faults;
                rollbacks_refused += r.rollbacks_refused;
                evictions += r.evictions;
            }
            Err(f) => failures.push(f.to_string()),
        }
    }
    println!(
        "simulation: {seeds} seeds from {first}, {extensions} extensions, {pauses} pauses, {resumes} resumes, \
         {crashes} crashes, {faults} disk faults, {metadata_faults} lost or misplaced commits, \
         {rollbacks_refused} SPM starts refused for a rollback, {evictions} hosts evicted by a lost \
         header write, {} failed",
        failures.len()
    );
    println!(
        "life cycle: {lifecycles} seeds, {closes} volumes closed, {deletes} deleted, {reduces} \
         reduced, {refused_held} deletes of open volumes refused (held), {refused_closing} of \
         closed ones whose hold was still on disk, {refused_parked} refused (parked), \
         {holds_unseen} tried on a held volume whose hold a fault hid and \
         {unseen_starting} while its host was starting, {reclaimed} extents \
         reclaimed, {acks} releases acknowledged, {stopped} guests stopped (volume gone), \
         {starts_with_released} SPM starts on a release floor, {retracted} deletes or \
         reduces that emptied replies first"
    );
    println!(
        "LUN removal: {removal_seeds} seeds, {started} attempts started, {finished} finished, \
         {refused} refused ({refused_moving} by a hold read after the `moving` commit, \
         {hold_unseen} by a holder no hold record showed), {interrupted} cut short by the SPM's \
         end, {cleared} `moving` cleared at an SPM start, {moved} segments moved, {reopens} \
         volumes opened again, {waited} of them waited on `moving`"
    );
    assert!(
        failures.is_empty(),
        "{} of {seeds} seeds failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        pauses > 0 && resumes > 0 && crashes > 0 && faults > 0,
        "the seeds exercised too little"
    );
}

#[test]
fn replay() {
    let Some(seed) = env_u64("SPMBOX_SIM_SEED") else {
        println!("skipped: replay: set SPMBOX_SIM_SEED to replay one seed");
        return;
    };
    println!("{:?}", Scenario::from_seed(seed));
    match run_seed(seed) {
        Ok(report) => println!("{report:?}"),
        Err(failure) => panic!("{failure}"),
    }
}

fn clean(seed: u64) -> Scenario {
    Scenario {
        seed,
        max_hosts: 8,
        active_hosts: 4,
        volumes_per_host: 2,
        faults: Faults::NONE,
        crash_ppm: 0,
        failover_at: None,
        faults_until: Duration::ZERO,
        add_capacity_at: Duration::from_secs(20),
        settle: Duration::from_secs(120),
        bug: None,
        withdraw: None,
        twin_spms_at: None,
        superblock_damage: None,
        metadata_fault: None,
        lifecycle: None,
        lun_removal: None,
    }
}

#[test]
fn guests_pause_when_the_pool_is_exhausted_and_resume_when_capacity_is_added() {
    let report = run(clean(1)).unwrap_or_else(|f| panic!("{f}"));
    assert!(report.pauses > 0, "{report:?}");
    assert_eq!(report.pauses, report.resumes, "{report:?}");
}

#[test]
fn a_2000_host_mailbox_with_failover_and_every_fault_runs_clean() {
    let scenario = Scenario {
        max_hosts: 2000,
        active_hosts: 12,
        faults: Faults::all(20_000),
        crash_ppm: 2_000,
        failover_at: Some(Duration::from_secs(3)),
        faults_until: Duration::from_secs(10),
        ..clean(7)
    };
    let report = run(scenario).unwrap_or_else(|f| panic!("{f}"));
    assert!(report.extensions > 0, "{report:?}");
}

#[test]
fn a_backend_that_replies_without_extending_is_caught() {
    let scenario = Scenario {
        bug: Some(Bug::ReplyWithoutExtending),
        ..clean(3)
    };
    let failure = run(scenario).expect_err("the broken backend went unnoticed");
    assert!(failure.what.contains("committed"), "{failure}");
    assert!(
        failure.to_string().contains("SPMBOX_SIM_SEED=3"),
        "{failure}"
    );
}

#[test]
fn a_backend_that_replies_before_its_commit_is_caught_by_a_crash() {
    // Crashes at commits make the reply outlive the extension it announced.
    let caught = (0..40).any(|seed| {
        let scenario = Scenario {
            bug: Some(Bug::ReplyBeforeCommit),
            crash_ppm: 200_000,
            faults_until: Duration::from_secs(30),
            ..clean(seed)
        };
        run(scenario).is_err()
    });
    assert!(
        caught,
        "40 seeds with a backend that replies before committing all passed"
    );
}

#[test]
fn a_pool_that_forgets_to_mark_extents_used_is_caught() {
    let scenario = Scenario {
        bug: Some(Bug::PoolForgetsExtentsUsed),
        ..clean(5)
    };
    let failure = run(scenario).expect_err("the broken pool went unnoticed");
    assert!(
        failure.what.contains("counts as free")
            || failure.what.contains("belongs to both")
            // The broken pool's commit does not decode as that state, so a
            // host is caught being told a size the committed pool lacks.
            || failure.what.contains("but the pool committed"),
        "{failure}"
    );
}

/// A host takes back a parked request (restarts, then asks for less under
/// its new generation) 5 s in; capacity comes at 40 s.
fn withdrawn(seed: u64, restart_spm: bool) -> Scenario {
    Scenario {
        withdraw: Some(Withdraw {
            at: Duration::from_secs(5),
            restart_spm,
        }),
        add_capacity_at: Duration::from_secs(40),
        ..clean(seed)
    }
}

#[test]
fn a_request_withdrawn_while_parked_is_never_carried_out() {
    for seed in 1..=4 {
        let report = run(withdrawn(seed, false)).unwrap_or_else(|f| panic!("{f}"));
        assert_eq!(
            report.withdrawals, 1,
            "seed {seed}: nothing was parked to withdraw"
        );
    }
}

#[test]
fn a_request_withdrawn_while_parked_is_not_carried_out_after_an_spm_restart_either() {
    for seed in 1..=4 {
        let report = run(withdrawn(seed, true)).unwrap_or_else(|f| panic!("{f}"));
        assert_eq!(
            report.withdrawals, 1,
            "seed {seed}: nothing was parked to withdraw"
        );
    }
}

/// The SPM restarts as two engines at once (two paths to one LUN) 3 s in,
/// while guests wait for space; capacity comes at 20 s.
fn twins(seed: u64) -> Scenario {
    Scenario {
        twin_spms_at: Some(Duration::from_secs(3)),
        ..clean(seed)
    }
}

#[test]
fn two_spms_started_at_one_epoch_leave_one_acting_and_the_other_never_commits() {
    for seed in 1..=4 {
        let report = run(twins(seed)).unwrap_or_else(|f| panic!("{f}"));
        assert_eq!(report.spms_deposed, 1, "seed {seed}: {report:?}");
        assert!(report.extensions > 0, "seed {seed}: {report:?}");
    }
}

#[test]
fn two_spms_at_one_epoch_that_cannot_tell_each_other_apart_are_caught() {
    // Both act, each on its own pool, and their commits overwrite each
    // other: a host is told of an extension the other SPM's commit undid,
    // a volume shrinks, or an extent is committed to two volumes.
    let failure = run(Scenario {
        bug: Some(Bug::TwinsShareOwner),
        // Capacity comes first, so that both pools have free extents.
        add_capacity_at: Duration::from_secs(1),
        ..twins(1)
    })
    .expect_err("two SPMs acting at one epoch went unnoticed");
    assert!(
        failure.what.contains("given to two volumes")
            || failure.what.contains("but the pool committed")
            || failure.what.contains("shrank"),
        "{failure}"
    );
}

fn superblock_damaged(seed: u64, backup_too: bool) -> Scenario {
    Scenario {
        superblock_damage: Some(SuperblockDamage {
            at: Duration::from_secs(2),
            backup_too,
        }),
        ..clean(seed)
    }
}

#[test]
fn a_damaged_superblock_is_read_from_its_backup() {
    for seed in 1..=4 {
        let report = run(superblock_damaged(seed, false)).unwrap_or_else(|f| panic!("{f}"));
        assert!(
            report.superblock_backup_reads >= 2,
            "seed {seed}: {report:?}"
        );
        assert_eq!(report.superblock_refusals, 0, "seed {seed}: {report:?}");
    }
}

#[test]
fn with_the_superblock_and_its_backup_damaged_nothing_starts_until_repaired() {
    for seed in 1..=4 {
        let report = run(superblock_damaged(seed, true)).unwrap_or_else(|f| panic!("{f}"));
        assert!(report.superblock_refusals >= 2, "seed {seed}: {report:?}");
        assert!(report.resumes > 0, "seed {seed}: {report:?}");
    }
}

/// A metadata commit that extends a volume 2 s in is lost (or, with
/// `misplaced`, lands at the other copy's place) while the SPM believes it
/// landed; the SPM restarts at the next instant, its reply to the host
/// already in the outbox. Capacity comes first, so that the pool has free
/// extents to hand out again.
fn metadata_fault(seed: u64, misplaced: bool) -> Scenario {
    Scenario {
        metadata_fault: Some(MetadataFault {
            at: Duration::from_secs(2),
            misplaced,
            restart_after: Duration::ZERO,
        }),
        add_capacity_at: Duration::from_secs(1),
        ..clean(seed)
    }
}

#[test]
fn an_spm_restarting_after_a_lost_commit_is_refused_and_the_commit_restored() {
    for seed in 1..=4 {
        let report = run(metadata_fault(seed, false)).unwrap_or_else(|f| panic!("{f}"));
        assert_eq!(report.metadata_faults, 1, "seed {seed}: {report:?}");
        assert_eq!(report.rollbacks_refused, 1, "seed {seed}: {report:?}");
        assert_eq!(report.pauses, report.resumes, "seed {seed}: {report:?}");
    }
}

#[test]
fn an_spm_restarting_after_a_misplaced_commit_is_refused_and_the_commit_restored() {
    for seed in 1..=4 {
        let report = run(metadata_fault(seed, true)).unwrap_or_else(|f| panic!("{f}"));
        assert_eq!(report.metadata_faults, 1, "seed {seed}: {report:?}");
        assert_eq!(report.rollbacks_refused, 1, "seed {seed}: {report:?}");
        assert_eq!(report.pauses, report.resumes, "seed {seed}: {report:?}");
    }
}

/// What the checks say when an SPM starts on rolled-back metadata: an
/// extent the lost commit gave one volume is given to another, a host is
/// told of a size the pool lacks, or a guest's map of the rolled-back
/// metadata no longer reaches what it wrote.
fn caught_rollback(what: &str) -> bool {
    what.contains("given to two volumes")
        || what.contains("but the pool committed")
        || what.contains("a write lost")
}

#[test]
fn an_spm_that_starts_on_metadata_a_lost_commit_rolled_back_is_caught() {
    // A seed whose rolled-back pool gives a lost commit's extents to
    // another volume: the allocation rule grows a volume in place, back
    // into the extents the lost commit gave it, so most seeds never do.
    let failure = run(Scenario {
        bug: Some(Bug::SpmSkipsRollbackCheck),
        ..metadata_fault(73, false)
    })
    .expect_err("an SPM starting on rolled-back metadata went unnoticed");
    assert!(caught_rollback(&failure.what), "{failure}");
}

#[test]
fn an_spm_that_starts_on_metadata_a_misplaced_commit_rolled_back_is_caught() {
    let failure = run(Scenario {
        bug: Some(Bug::SpmSkipsRollbackCheck),
        ..metadata_fault(26, true)
    })
    .expect_err("an SPM starting on rolled-back metadata went unnoticed");
    assert!(caught_rollback(&failure.what), "{failure}");
}

fn lifecycle(seed: u64) -> Scenario {
    Scenario {
        lifecycle: Some(Lifecycle {
            from: Duration::from_millis(500),
            every: Duration::from_millis(50),
            probe_percent: 30,
        }),
        ..clean(seed)
    }
}

/// Room early, and deletes of held volumes that the bugs let through
/// while the other guests still grow into the extents they release.
fn deletes_while_growing(seed: u64, bug: Bug) -> Scenario {
    Scenario {
        bug: Some(bug),
        add_capacity_at: Duration::from_secs(1),
        lifecycle: Some(Lifecycle {
            from: Duration::from_millis(1_500),
            every: Duration::from_millis(100),
            probe_percent: 20,
        }),
        ..clean(seed)
    }
}

#[test]
fn volumes_are_closed_deleted_and_reduced_and_their_extents_reclaimed() {
    let report = run(lifecycle(11)).unwrap_or_else(|f| panic!("{f}"));
    assert!(report.deletes > 0 && report.reduces > 0, "{report:?}");
    assert!(
        report.refused_held > 0 && report.reclaimed > 0,
        "{report:?}"
    );
}

#[test]
fn deleting_held_volumes_stops_their_guests_before_the_extents_are_reused() {
    // The hosts' acknowledgements alone keep every guest's data apart.
    let mut stopped = 0;
    for seed in 0..8 {
        let report = run(deletes_while_growing(seed, Bug::DeleteHeldVolumes))
            .unwrap_or_else(|f| panic!("{f}"));
        assert!(report.reclaimed > 0, "{report:?}");
        stopped += report.stopped;
    }
    assert!(stopped > 0, "no held volume was deleted");
}

#[test]
fn an_spm_that_reclaims_before_the_hosts_acknowledge_is_caught() {
    let mut caught = 0;
    for seed in 0..40 {
        let Err(failure) = run(deletes_while_growing(seed, Bug::ReclaimIgnoresAcks)) else {
            continue;
        };
        assert!(
            failure.what.contains("still maps it")
                || failure.what.contains("which the live pool gives")
                || failure.what.contains("which the committed pool gives")
                || failure.what.contains("still owns")
                || failure.what.contains("before every host that held"),
            "{failure}"
        );
        caught += 1;
    }
    assert!(caught > 0, "the early reclaim went unnoticed in 40 seeds");
}

/// The first `n` seeds that remove a LUN, with `bug`: how many fail, and
/// the failures.
fn removals_with(bug: Option<Bug>, n: usize) -> (usize, Vec<String>) {
    let scenarios: Vec<Scenario> = (0..)
        .map(Scenario::from_seed)
        .filter(|s| s.lun_removal.is_some())
        .take(n)
        .map(|s| Scenario { bug, ..s })
        .collect();
    let failures: Vec<String> = scenarios
        .into_iter()
        .filter_map(|s| run(s).err())
        .map(|f| f.to_string())
        .collect();
    (n, failures)
}

#[test]
fn luns_are_removed_while_hosts_open_volumes_again() {
    let (mut finished, mut moved, mut reopens) = (0, 0, 0);
    for seed in (0..)
        .filter(|&s| Scenario::from_seed(s).lun_removal.is_some())
        .take(6)
    {
        let report = run_seed(seed).unwrap_or_else(|f| panic!("{f}"));
        finished += report.lun_removals_finished;
        moved += report.segments_moved;
        reopens += report.reopens;
    }
    assert_eq!(finished, 6, "every removal ends with its LUN dropped");
    assert!(
        moved > 0 && reopens > 0,
        "{moved} segments moved, {reopens} reopens"
    );
}

#[test]
fn a_host_that_opens_a_volume_being_moved_without_waiting_is_caught() {
    let (n, failures) = removals_with(Some(Bug::OpenIgnoresMoving), 40);
    println!("{} of {n} seeds caught", failures.len());
    for f in &failures {
        assert!(f.contains("a write lost"), "{f}");
    }
    assert!(
        !failures.is_empty(),
        "opens that ignore `moving` went unnoticed in {n} seeds"
    );
}

#[test]
fn an_spm_that_moves_a_volume_without_reading_the_holds_is_caught() {
    let (n, failures) = removals_with(Some(Bug::MoveSkipsHolds), 40);
    println!("{} of {n} seeds caught", failures.len());
    for f in &failures {
        assert!(f.contains("a write lost"), "{f}");
    }
    assert!(
        !failures.is_empty(),
        "moves of held volumes went unnoticed in {n} seeds"
    );
}
