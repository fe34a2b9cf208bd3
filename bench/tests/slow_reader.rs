//! The slow-reader tools on their own (no proxy): TCP alone holds the flooding client back,
//! and once the instance reads, its answer matches what was sent.

use std::net::TcpListener;

use bench::slow::{run_flood, serve_hold_instance};

#[test]
fn a_flood_against_an_instance_that_stops_reading_is_held_back_then_fully_answered() {
    let go = std::env::temp_dir().join(format!("bench-slow-reader-{}", std::process::id()));
    let _ = std::fs::remove_file(&go);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let instance_go = go.clone();
    std::thread::spawn(move || serve_hold_instance(listener, &instance_go));
    let report = run_flood(addr, "/", &go).expect("the flood completes");
    let _ = std::fs::remove_file(&go);
    assert!(report.held_after > 0, "{report:?}");
    assert!(report.ok, "every byte arrived in order: {report:?}");
}
